// Split-KV merge: one block of 4 warps per (token, query head) row of a valid request
// combines the per-split states (log2-domain lse, normalized output) into the final row,
// adding the sink term of the head when sinks are given. A row whose splits saw no key gets
// 0 / -inf. The split weights are computed once per row (thread s holds split s); warp w then
// accumulates splits w, w + 4, ... with independent loads, and the 4 partial rows are summed.
#include <cmath>

#include "attn_launch.h"
#include "cuda_utils.cuh"

namespace jpa {
namespace cuda {
namespace {

constexpr int kMergeThreads = 128;
constexpr int kMergeWarps = kMergeThreads / 32;
static_assert(kMaxSplits <= kMergeThreads, "one thread per split for the weights");

template <int D>
__global__ void __launch_bounds__(kMergeThreads) attn_merge_kernel(
    const __grid_constant__ AttnLaunch L) {
  constexpr int NV = (D + 127) / 128;  // float4 chunks per lane
  __shared__ float s_red[kMergeWarps];
  __shared__ float s_w[kMergeThreads];
  __shared__ float4 s_acc[kMergeWarps][NV][32];

  const AttnParams& p = L.p;
  const int b = blockIdx.y;
  int64_t row_begin, q_len;
  if (L.fused_checks) {  // decode: fixed rows per request; validity arrives as NaN split lse
    row_begin = int64_t(b) * p.q_len_per_req;
    q_len = p.q_len_per_req;
  } else {
    const ReqMeta meta = L.meta[b];
    if (meta.status != kReqValid) return;
    row_begin = meta.row_begin;
    q_len = meta.q_len;
  }
  // A mixed batch's short requests are merged by their own launch (AttnLaunch::rows_class).
  if (!serves_rows(L, int(q_len) * L.group)) return;
  const int64_t Hq = p.num_q_heads;
  const int64_t idx = blockIdx.x;  // (token in request, head)
  if (idx >= q_len * Hq) return;  // the whole block leaves together
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const int64_t head = idx % Hq;
  const int64_t row = (row_begin + idx / Hq) * Hq + head;
  const int64_t ss = p.num_tokens * Hq;  // split stride (rows)
  const int S = L.num_splits;

  // Partial outputs loaded up front (warp w: splits w, w + 4, ...), so their latency overlaps
  // the lse loads and the weight reductions. Every split wrote its rows (zeros when empty).
  constexpr int kPer = (kMaxSplits + kMergeWarps - 1) / kMergeWarps;
  const float* base = L.part_out + row * D + lane * 4;
  float4 xs[kPer][NV];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int s = warp + i * kMergeWarps;
#pragma unroll
    for (int c = 0; c < NV; ++c)
      xs[i][c] = (s < S && c * 128 + lane * 4 < D)
                     ? *reinterpret_cast<const float4*>(base + s * ss * D + c * 128)
                     : make_float4(0.f, 0.f, 0.f, 0.f);
  }
  const float ls = t < S ? L.part_lse[t * ss + row] : -INFINITY;
  // A NaN split lse marks an invalid request (or pages) found by the tiles (fused checks).
  if (__syncthreads_or(ls != ls)) {
    if (t * 4 < D) store4(p.out, row * D + t * 4, p.out_dtype, make_float4(NAN, NAN, NAN, NAN));
    if (t == 0) p.lse[row] = NAN;
    return;
  }
  float v = warp_max(ls);
  if (lane == 0) s_red[warp] = v;
  __syncthreads();
  float M = s_red[0];
#pragma unroll
  for (int w = 1; w < kMergeWarps; ++w) M = fmaxf(M, s_red[w]);
  __syncthreads();
  if (M == -INFINITY) {  // no visible key in any split (sink or not)
    if (t * 4 < D) store4(p.out, row * D + t * 4, p.out_dtype, make_float4(0.f, 0.f, 0.f, 0.f));
    if (t == 0) p.lse[row] = -INFINITY;
    return;
  }
  const float sink2 = p.sinks != nullptr ? p.sinks[head] * kLog2e : -INFINITY;
  const float M2 = fmaxf(M, sink2);
  const float e = exp2f(ls - M2);  // 0 for empty splits and t >= S
  v = warp_sum(e);
  if (lane == 0) s_red[warp] = v;
  __syncthreads();
  float den = sink2 == -INFINITY ? 0.0f : exp2f(sink2 - M2);
#pragma unroll
  for (int w = 0; w < kMergeWarps; ++w) den += s_red[w];
  s_w[t] = e / den;
  __syncthreads();

  float4 acc[NV];
#pragma unroll
  for (int c = 0; c < NV; ++c) acc[c] = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int s = warp + i * kMergeWarps;
    const float w = s < S ? s_w[s] : 0.0f;
#pragma unroll
    for (int c = 0; c < NV; ++c) fma4(acc[c], w, xs[i][c]);
  }
#pragma unroll
  for (int c = 0; c < NV; ++c) s_acc[warp][c][lane] = acc[c];
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int c = 0; c < NV; ++c) {
      float4 o = s_acc[0][c][lane];
#pragma unroll
      for (int w = 1; w < kMergeWarps; ++w) {
        const float4 x = s_acc[w][c][lane];
        o.x += x.x;
        o.y += x.y;
        o.z += x.z;
        o.w += x.w;
      }
      const int d = c * 128 + lane * 4;
      if (d < D) store4(p.out, row * D + d, p.out_dtype, o);
    }
    if (lane == 0) p.lse[row] = (M2 + log2f(den)) * kLn2;
  }
}

}  // namespace

cudaError_t launch_attn_merge(const AttnLaunch& L, cudaStream_t stream) {
  const int64_t rows = L.p.max_q_len * L.p.num_q_heads;  // rows a request can own
  if (rows >= (int64_t(1) << 31)) return cudaErrorInvalidValue;
  const dim3 grid(unsigned(rows), unsigned(L.p.batch));
  switch (L.p.head_dim) {
    case 64: attn_merge_kernel<64><<<grid, kMergeThreads, 0, stream>>>(L); break;
    case 128: attn_merge_kernel<128><<<grid, kMergeThreads, 0, stream>>>(L); break;
    case 256: attn_merge_kernel<256><<<grid, kMergeThreads, 0, stream>>>(L); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace jpa
