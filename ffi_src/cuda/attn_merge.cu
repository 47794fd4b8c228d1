// Split-KV merge: one warp per (token, query head) row of a valid request combines the
// per-split states (log2-domain lse, normalized output) into the final row, adding the sink
// term of the head when sinks are given. A row whose splits saw no key gets 0 / -inf.
#include <cmath>

#include "attn_launch.h"
#include "cuda_utils.cuh"

namespace jpa {
namespace cuda {
namespace {

constexpr int kMergeWarps = 8;

__global__ void __launch_bounds__(kMergeWarps * 32) attn_merge_kernel(
    const __grid_constant__ AttnLaunch L) {
  const AttnParams& p = L.p;
  const int b = blockIdx.y;
  const ReqMeta meta = L.meta[b];
  if (meta.status != kReqValid) return;
  const int64_t Hq = p.num_q_heads;
  const int64_t idx = int64_t(blockIdx.x) * kMergeWarps + (threadIdx.x >> 5);
  if (idx >= int64_t(meta.q_len) * Hq) return;
  const int lane = threadIdx.x & 31;
  const int64_t head = idx % Hq;
  const int64_t row = (meta.row_begin + idx / Hq) * Hq + head;
  const int64_t split_stride = p.num_tokens * Hq;
  const int S = L.num_splits;
  const int D = int(p.head_dim);

  float M = -INFINITY;
  for (int s = 0; s < S; ++s) M = fmaxf(M, L.part_lse[s * split_stride + row]);

  if (M == -INFINITY) {
    for (int d = lane * 4; d < D; d += 128)
      store4(p.out, row * D + d, p.out_dtype, make_float4(0.f, 0.f, 0.f, 0.f));
    if (lane == 0) p.lse[row] = -INFINITY;
    return;
  }
  float sink2 = -INFINITY;
  if (p.sinks != nullptr) sink2 = p.sinks[head] * kLog2e;
  const float M2 = fmaxf(M, sink2);
  float den = sink2 == -INFINITY ? 0.0f : exp2f(sink2 - M2);
  for (int s = 0; s < S; ++s) den += exp2f(L.part_lse[s * split_stride + row] - M2);
  const float inv = 1.0f / den;

  for (int d = lane * 4; d < D; d += 128) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s = 0; s < S; ++s) {
      const float ls = L.part_lse[s * split_stride + row];
      if (ls == -INFINITY) continue;  // empty split: its output was never written
      const float w = exp2f(ls - M2) * inv;
      const float4 v =
          *reinterpret_cast<const float4*>(L.part_out + (s * split_stride + row) * D + d);
      acc.x += w * v.x;
      acc.y += w * v.y;
      acc.z += w * v.z;
      acc.w += w * v.w;
    }
    store4(p.out, row * D + d, p.out_dtype, acc);
  }
  if (lane == 0) p.lse[row] = (M2 + log2f(den)) * kLn2;
}

}  // namespace

cudaError_t launch_attn_merge(const AttnLaunch& L, cudaStream_t stream) {
  const int64_t rows = L.p.max_q_len * L.p.num_q_heads;
  const dim3 grid(unsigned((rows + kMergeWarps - 1) / kMergeWarps), unsigned(L.p.batch));
  attn_merge_kernel<<<grid, kMergeWarps * 32, 0, stream>>>(L);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace jpa
