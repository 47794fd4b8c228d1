// The fused split-KV merge (AttnLaunch::merge_count; split decode with JPA_CUDA_FUSED_MERGE=1,
// and the mixed split launch's short requests): the last split CTA of a (request, KV head)
// combines the S partial states of that group's rows into the final rows, with the semantics
// of the merge kernel (attn_merge.cu):
//   out = sum_s w_s o_s,   w_s = 2^(lse_s - M) / den,   den = sum_s 2^(lse_s - M) [+ 2^(sink - M)]
// with M the largest split lse (and sink), lse = (M + log2 den) in natural log; a row whose
// splits saw no key is 0 / -inf, one with a NaN split lse (an invalid request) NaN / NaN.
//
// Experimental for decode (off by default there). It runs in the kernel's tail, after
// every other CTA of the group, so its latency is the call's. On the H200 (run 8) two earlier
// versions were slower than the merge launch they replace (1 x 32768: 41.9 us with one warp
// per row and 8 loads in flight, 47.6 us with the partials staged to shared memory by
// cp.async, against 40.3 us), both with a __threadfence (fence.sc) in every thread of every
// split CTA around the count. This version (not yet measured): one acquire-release atomic per
// CTA (sm80/attn_tile.cuh), and one warp per row with 16 splits' loads in flight per lane
// (8 at head_dim 256, and in tiles capped at 128 registers), so 33 splits take 3 round
// trips to L2 instead of 5.
// __ldcg reads L2, where the other SMs' partials are (L1 is not coherent).
#pragma once

#include <cmath>
#include <cstdint>

#include "attn_common.cuh"
#include "cuda_utils.cuh"

namespace jpa {
namespace cuda {

static_assert(kMaxSplits <= 64, "a lane holds the lse of two splits");

// One output row (token * Hq + head) merged by one warp from its partials (split 0's at
// index prow, part_row in attn_common.cuh): lane l owns head_dim columns [4l, 4l + 4) of
// each 128-wide chunk; kBatch splits' loads in flight per lane.
template <int D, int kBatch>
__device__ __forceinline__ void merge_row_warp(const AttnLaunch& L, int64_t row, int64_t prow,
                                               int64_t head, int lane) {
  constexpr int NV = (D + 127) / 128;  // float4 columns per lane
  const AttnParams& p = L.p;
  const int S = L.num_splits;
  const int64_t ss = part_split_stride(L);
  const float l0 = lane < S ? __ldcg(L.part_lse + lane * ss + prow) : -INFINITY;
  const float l1 = lane + 32 < S ? __ldcg(L.part_lse + (lane + 32) * ss + prow) : -INFINITY;
  auto store_row = [&](const float4 (&o)[NV], float lse) {
#pragma unroll
    for (int c = 0; c < NV; ++c)
      if (c * 128 + lane * 4 < D) store4(p.out, row * D + c * 128 + lane * 4, p.out_dtype, o[c]);
    if (lane == 0) p.lse[row] = lse;
  };
  float4 acc[NV];
  if (__any_sync(0xffffffffu, l0 != l0 || l1 != l1)) {
#pragma unroll
    for (int c = 0; c < NV; ++c) acc[c] = make_float4(NAN, NAN, NAN, NAN);
    return store_row(acc, NAN);
  }
#pragma unroll
  for (int c = 0; c < NV; ++c) acc[c] = make_float4(0.f, 0.f, 0.f, 0.f);
  const float M = warp_max(fmaxf(l0, l1));
  if (M == -INFINITY) return store_row(acc, -INFINITY);  // no visible key (sink or not)
  const float sink2 = p.sinks != nullptr ? p.sinks[head] * kLog2e : -INFINITY;
  const float M2 = fmaxf(M, sink2);
  const float e0 = exp2f(l0 - M2), e1 = exp2f(l1 - M2);  // 0 for empty and absent splits
  float den = warp_sum(e0 + e1);
  if (sink2 != -INFINITY) den += exp2f(sink2 - M2);

  const float* base = L.part_out + prow * D + lane * 4;
  for (int s0 = 0; s0 < S; s0 += kBatch) {
    float4 x[kBatch][NV];  // every split wrote its rows (zeros when empty)
#pragma unroll
    for (int i = 0; i < kBatch; ++i)
#pragma unroll
      for (int c = 0; c < NV; ++c)
        x[i][c] = s0 + i < S && c * 128 + lane * 4 < D
                      ? __ldcg(reinterpret_cast<const float4*>(base + (s0 + i) * ss * D + c * 128))
                      : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int s = s0 + i;  // the weight of an absent split (s >= S) is 0
      const float w = __shfl_sync(0xffffffffu, s < 32 ? e0 : e1, s & 31);
#pragma unroll
      for (int c = 0; c < NV; ++c) fma4(acc[c], w, x[i][c]);
    }
  }
  const float inv = 1.0f / den;
#pragma unroll
  for (int c = 0; c < NV; ++c)
    acc[c] = make_float4(acc[c].x * inv, acc[c].y * inv, acc[c].z * inv, acc[c].w * inv);
  store_row(acc, (M2 + log2f(den)) * kLn2);
}

// Merges the packed rows [r0, r0 + nrows) of the group of request b and KV head kvh
// (row_begin: the request's first token; packed row R = token R / G, head kvh * G + R % G),
// one warp per row.
// Not inlined: its code stays out of the register allocation of the tile's key loop (inlined,
// an earlier version made the fp8 decode tile spill 40 bytes inside that loop). A tile
// capped at 128 registers (kMaxRegs) keeps 8 loads in flight: 16 made that loop spill again.
template <int D, int NT, int kMaxRegs>
__device__ __noinline__ void merge_group_rows(const AttnLaunch& L, int b, int64_t row_begin,
                                              int kvh, int r0, int nrows) {
  constexpr int kBatch = D > 128 || kMaxRegs <= 128 ? 8 : 16;
  const int G = L.group;
  const int lane = threadIdx.x & 31;
  for (int i = threadIdx.x >> 5; i < nrows; i += NT / 32) {
    const int R = r0 + i;
    const int64_t head = int64_t(kvh) * G + R % G;
    const int64_t row = (row_begin + R / G) * L.p.num_q_heads + head;
    merge_row_warp<D, kBatch>(L, row, part_row(L, 0, b, kvh, R, row), head, lane);
  }
}

}  // namespace cuda
}  // namespace jpa
