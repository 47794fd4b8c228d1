// What a CTA of either attention family (sm80 tiles, sm90 prefill) works on, in one place, so
// the families split rows and keys identically (the merge combines their splits by that
// split): the block's rows of its request, their positions, the block's key range (the union
// of its rows' visible ranges) and this KV split's share of it, whole key tiles each; and the
// staging of the block's query rows into shared memory.
#pragma once

#include <cstdint>

#include "../common/dtypes.h"
#include "../common/mask.h"
#include "attn_common.cuh"
#include "cuda_utils.cuh"

namespace jpa {
namespace cuda {

// 32-bit row and key math: rows <= T * Hq < 2^31, and key indices (plus one tile) stay below
// 2^31 because the launcher bounds the block table's capacity. Every memory offset the
// kernels form from these is int64 (docs/int64_audit.md).
struct TileWork {
  int rows_total;  // packed rows of the request: q_len * G
  int r0, r_end;   // this block's rows [r0, r_end)
  int pos_first, pos_last;  // positions of the block's first and last rows
  int kb, ke;      // this split's keys [kb, ke)
  int ntiles;      // key tiles of BN keys covering [kb, ke)
};

// `meta` is a valid request with q_len > 0 and r0 = rb * BM < q_len * G.
template <int BM, int BN>
__device__ __forceinline__ TileWork tile_work(const AttnParams& p, const ReqMeta& meta, int G,
                                              int rb, int split, int num_splits) {
  TileWork w;
  w.rows_total = meta.q_len * G;
  w.r0 = rb * BM;
  w.r_end = min(w.r0 + BM, w.rows_total);
  w.pos_first = meta.kv_len - meta.q_len + w.r0 / G;
  w.pos_last = meta.kv_len - meta.q_len + (w.r_end - 1) / G;
  int64_t lo, hi;
  block_key_range(w.pos_first, w.pos_last, meta.kv_len, p.causal, p.window_left, &lo, &hi);
  int64_t per = (hi - lo + num_splits - 1) / num_splits;
  per = (per + BN - 1) / BN * BN;
  w.kb = int(min(hi, lo + per * split));
  w.ke = int(min(hi, int64_t(w.kb) + per));
  w.ntiles = (w.ke - w.kb + BN - 1) / BN;
  return w;
}

// Stages the block's BM packed rows x D of q (rows past the request: zeros) into shared
// memory in the compute dtype CT: the 16-byte chunk c of block row r goes to
// tile + offset(r, c). Row R = token R / G of the request, query head kvh * G + R % G.
// 16-byte loads when L.q_vec (q in CT, aligned, strides multiples of 8), else per element.
// AllInFlight (the sm90 kernel): with 16-byte loads each thread loads all its chunks into
// registers before it stores any, so the staging waits for one memory latency instead of
// about one per two chunks (run 11's ncu put 4% of the sm90 MMA warps' time at the stores
// waiting for Q). The sm80 tiles keep the plain loop: at head_dim 128 / 256 the batch makes
// two of their kernels spill.
template <typename CT, int D, int BM, int NT, bool AllInFlight = false, class Offset>
__device__ __forceinline__ void stage_q(const AttnLaunch& L, const ReqMeta& meta, int kvh,
                                        const TileWork& w, int tid, unsigned char* tile,
                                        Offset offset) {
  const AttnParams& p = L.p;
  const int G = L.group;
  const int qbytes = dtype_bytes(p.q.dtype);
  constexpr int kChunks = BM * (D / 8) / NT;  // per thread
  static_assert((BM * (D / 8)) % NT == 0, "Q staging loop");
  // Chunk `it` of this thread: block row r, 16-byte column c; the index of its first element
  // in q, or -1 for a row past the request.
  auto chunk = [&](int it, int& r, int& c) -> int64_t {
    const int idx = tid + it * NT;
    r = idx / (D / 8);
    c = idx % (D / 8);
    const int R = w.r0 + r;
    if (R >= w.rows_total) return -1;
    const int64_t tok = meta.row_begin + R / G;
    const int64_t head = int64_t(kvh) * G + R % G;
    // int64: a strided q (a packed QKV) passes 2^31 elements / bytes at large T.
    return tok * p.q.stride_tok + head * p.q.stride_head + c * 8;
  };
  auto load16 = [&](int64_t e) {
    return *reinterpret_cast<const uint4*>(static_cast<const char*>(p.q.ptr) + e * qbytes);
  };
  if constexpr (AllInFlight) {
    if (L.q_vec) {
      uint4 v[kChunks];
      int r[kChunks], c[kChunks];
#pragma unroll
      for (int j = 0; j < kChunks; ++j) {
        const int64_t e = chunk(j, r[j], c[j]);
        v[j] = e >= 0 ? load16(e) : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int j = 0; j < kChunks; ++j) *reinterpret_cast<uint4*>(tile + offset(r[j], c[j])) = v[j];
      return;
    }
  }
#pragma unroll 2
  for (int it = 0; it < kChunks; ++it) {
    int r, c;
    const int64_t e = chunk(it, r, c);
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (e >= 0) {
      if (L.q_vec) {
        v = load16(e);
      } else {
        uint32_t x[4];
#pragma unroll
        for (int k = 0; k < 4; ++k)
          x[k] = TypeTraits<CT>::pack(load_as_float(p.q.ptr, e + 2 * k, p.q.dtype),
                                      load_as_float(p.q.ptr, e + 2 * k + 1, p.q.dtype));
        v = make_uint4(x[0], x[1], x[2], x[3]);
      }
    }
    *reinterpret_cast<uint4*>(tile + offset(r, c)) = v;
  }
}

// How one finished row is written, from its running max M and sum lsum (log2 domain): the
// output is o * scale. Final (one split): lse is the natural-log lse with the head's sink
// (if any) folded in. Split partial: lse is the log2-domain lse without the sink (the merge
// adds it). A row that saw no key (lsum 0) gets scale 0 and lse -inf; callers write zeros
// for it rather than o * 0.
struct RowScale {
  float scale;
  float lse;
};

__device__ __forceinline__ RowScale final_row(float M, float lsum, const float* sinks,
                                              int64_t head, float v_scale) {
  if (!(lsum > 0.0f)) return {0.0f, -INFINITY};
  float lse2 = M + log2f(lsum);
  if (sinks != nullptr) {
    const float sink2 = sinks[head] * kLog2e;
    const float mm = fmaxf(lse2, sink2);
    lse2 = mm + log2f(exp2f(lse2 - mm) + exp2f(sink2 - mm));
  }
  return {exp2f(M - lse2) * v_scale, lse2 * kLn2};
}

__device__ __forceinline__ RowScale split_row(float M, float lsum, float v_scale) {
  if (!(lsum > 0.0f)) return {0.0f, -INFINITY};
  const float lse2 = M + log2f(lsum);
  return {exp2f(M - lse2) * v_scale, lse2};
}

}  // namespace cuda
}  // namespace jpa
