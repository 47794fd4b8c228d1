// The fused split-KV merge of split decode (AttnLaunch::merge_count): the last split CTA of
// a (request, KV head) combines the S partial states of that group's rows into the final
// rows, with the semantics of the merge kernel (attn_merge.cu):
//   out = sum_s w_s o_s,   w_s = 2^(lse_s - M) / den,   den = sum_s 2^(lse_s - M) [+ 2^(sink - M)]
// with M the largest split lse (and sink), lse = (M + log2 den) in natural log; a row whose
// splits saw no key is 0 / -inf, one with a NaN split lse (an invalid request) NaN / NaN.
//
// Experimental (JPA_CUDA_FUSED_MERGE=1; off by default): on the H200 it is slower than the
// merge launch it replaces (run 8, 1 x 32768: 47.6 us against 40.3 us; an earlier version
// with one warp per row and 8 loads in flight per lane: 41.9 us). This runs in the kernel's
// tail, after every other CTA of the group, so its latency is the call's: the fences, the
// count's round trip and the partials' reads all sit on the critical path. Not profiled yet;
// the suspects are the per-thread __threadfence (MEMBAR.SC.GPU) in every split CTA and the
// one SM pulling the group's S x rows x D partials alone.
//
// Staged: every partial row of a chunk of rows is copied to shared memory at once by
// cp.async (no registers held), while the warps compute the split weights from the lse;
// then the weighted sums read shared memory. cp.async.cg and __ldcg read L2, where the
// other SMs' partials are (L1 is not coherent).
#pragma once

#include <cmath>
#include <cstdint>

#include "attn_common.cuh"
#include "cuda_utils.cuh"

namespace jpa {
namespace cuda {

static_assert(kMaxSplits <= 64, "a lane holds the lse of two splits");

__device__ __forceinline__ float warp_max_all(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum_all(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

struct MergeRow {
  int64_t row;   // token * Hq + head
  int64_t head;  // query head (its sink)
};

// Packed row R of a (request, KV head) group (R = token of the request * G + head of the
// group) as an output row.
__device__ __forceinline__ MergeRow group_row(const AttnLaunch& L, int64_t row_begin, int kvh,
                                              int R) {
  const int G = L.group;
  const int64_t head = int64_t(kvh) * G + R % G;
  return MergeRow{(row_begin + R / G) * L.p.num_q_heads + head, head};
}

// Merges the packed rows [r0, r0 + nrows) of the group (row_begin: the request's first
// token, kvh: its KV head). All NT threads call it; `smem` (smem_bytes) is free scratch.
// Not inlined: its code stays out of the register allocation of the tile's key loop (inlined,
// the fp8 decode tile spilled 40 bytes inside that loop). Per staged row: S x D partial
// floats, then (after the chunk's rows) S weights and the row's lse per row; the launcher
// fuses the merge only when one row's share, (S D + S + 1) x 4 bytes, fits.
template <int D, int NT>
__device__ __noinline__ void merge_rows_staged(const AttnLaunch& L, unsigned char* smem,
                                               int smem_bytes, int64_t row_begin, int kvh,
                                               int r0, int nrows) {
  auto row_of = [&](int i) { return group_row(L, row_begin, kvh, r0 + i); };
  constexpr int C4 = D / 4;  // float4 columns of a row
  const AttnParams& p = L.p;
  const int S = L.num_splits;
  const int64_t ss = p.num_tokens * p.num_q_heads;  // split stride (rows)
  const int per_row = (S * D + S + 1) * 4;           // staged bytes per row
  const int chunk = max(1, min(nrows, smem_bytes / per_row));
  float* part = reinterpret_cast<float*>(smem);
  const uint32_t part_addr = smem_addr(smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for (int c0 = 0; c0 < nrows; c0 += chunk) {
    const int cn = min(chunk, nrows - c0);
    float* w = part + cn * S * D;  // [cn][S] weights (0 for empty splits)
    float* row_lse = w + cn * S;   // [cn]: NaN marks a NaN row, -inf an empty one
    for (int i = tid; i < cn * S * C4; i += NT) {
      const int r = i / (S * C4), s = (i / C4) % S, q = i % C4;
      const int64_t row = row_of(c0 + r).row;
      cp_async_16(part_addr + uint32_t(i) * 16, L.part_out + (s * ss + row) * D + q * 4, 16);
    }
    cp_async_commit();
    for (int r = warp; r < cn; r += NT / 32) {  // weights, while the copies are in flight
      const auto ro = row_of(c0 + r);
      const float l0 = lane < S ? __ldcg(L.part_lse + lane * ss + ro.row) : -INFINITY;
      const float l1 = lane + 32 < S ? __ldcg(L.part_lse + (lane + 32) * ss + ro.row) : -INFINITY;
      float lse = NAN, e0 = 0.0f, e1 = 0.0f;
      if (!__any_sync(0xffffffffu, l0 != l0 || l1 != l1)) {
        const float M = warp_max_all(fmaxf(l0, l1));
        if (M == -INFINITY) {  // no visible key in any split (sink or not)
          lse = -INFINITY;
        } else {
          const float sink2 = p.sinks != nullptr ? p.sinks[ro.head] * kLog2e : -INFINITY;
          const float M2 = fmaxf(M, sink2);
          e0 = exp2f(l0 - M2);  // 0 for empty and absent splits
          e1 = exp2f(l1 - M2);
          float den = warp_sum_all(e0 + e1);
          if (sink2 != -INFINITY) den += exp2f(sink2 - M2);
          e0 /= den;
          e1 /= den;
          lse = (M2 + log2f(den)) * kLn2;
        }
      }
      if (lane < S) w[r * S + lane] = e0;
      if (lane + 32 < S) w[r * S + lane + 32] = e1;
      if (lane == 0) row_lse[r] = lse;
    }
    cp_async_wait<0>();
    __syncthreads();
    for (int i = tid; i < cn * C4; i += NT) {
      const int r = i / C4, q = i % C4;
      const auto ro = row_of(c0 + r);
      const float lse = row_lse[r];
      float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
      if (lse != lse) {
        o = make_float4(NAN, NAN, NAN, NAN);
      } else if (lse != -INFINITY) {
        const float4* src = reinterpret_cast<const float4*>(part) + r * S * C4 + q;
        for (int s = 0; s < S; ++s) {
          const float ws = w[r * S + s];
          const float4 x = src[s * C4];
          o.x += ws * x.x;
          o.y += ws * x.y;
          o.z += ws * x.z;
          o.w += ws * x.w;
        }
      }
      store4(p.out, ro.row * D + q * 4, p.out_dtype, o);
      if (q == 0) p.lse[ro.row] = lse;
    }
    __syncthreads();  // the scratch is reused by the next chunk
  }
}

}  // namespace cuda
}  // namespace jpa
