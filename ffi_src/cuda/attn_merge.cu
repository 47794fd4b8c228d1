// Split-KV merge: one warp per (token, query head) row of a valid request combines the
// per-split states (log2-domain lse, normalized output) into the final row, adding the sink
// term of the head when sinks are given. A row whose splits saw no key gets 0 / -inf.
// The split weights are computed once (lane s holds split s and s + 32) and broadcast by
// shuffles, so the output loads of all splits are independent and stay in flight together.
#include <cmath>

#include "attn_launch.h"
#include "cuda_utils.cuh"

namespace jpa {
namespace cuda {
namespace {

constexpr int kMergeWarps = 8;
static_assert(kMaxSplits <= 64, "a lane holds the weights of two splits");

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <int D>
__global__ void __launch_bounds__(kMergeWarps * 32) attn_merge_kernel(
    const __grid_constant__ AttnLaunch L) {
  constexpr int NV = (D + 127) / 128;  // float4 chunks per lane
  const AttnParams& p = L.p;
  const int b = blockIdx.y;
  const ReqMeta meta = L.meta[b];
  if (meta.status != kReqValid) return;
  const int64_t Hq = p.num_q_heads;
  const int64_t idx = int64_t(blockIdx.x) * kMergeWarps + (threadIdx.x >> 5);
  if (idx >= int64_t(meta.q_len) * Hq) return;  // whole warps leave together
  const int lane = threadIdx.x & 31;
  const int64_t head = idx % Hq;
  const int64_t row = (meta.row_begin + idx / Hq) * Hq + head;
  const int64_t ss = p.num_tokens * Hq;  // split stride (rows)
  const int S = L.num_splits;

  const float ls0 = lane < S ? L.part_lse[lane * ss + row] : -INFINITY;
  const float ls1 = lane + 32 < S ? L.part_lse[(lane + 32) * ss + row] : -INFINITY;
  const float M = warp_max(fmaxf(ls0, ls1));
  if (M == -INFINITY) {  // no visible key in any split (sink or not)
#pragma unroll
    for (int v = 0; v < NV; ++v) {
      const int d = v * 128 + lane * 4;
      if (d < D) store4(p.out, row * D + d, p.out_dtype, make_float4(0.f, 0.f, 0.f, 0.f));
    }
    if (lane == 0) p.lse[row] = -INFINITY;
    return;
  }
  const float sink2 = p.sinks != nullptr ? p.sinks[head] * kLog2e : -INFINITY;
  const float M2 = fmaxf(M, sink2);
  float e0 = exp2f(ls0 - M2), e1 = exp2f(ls1 - M2);  // 0 for empty splits
  float den = warp_sum(e0 + e1);
  if (sink2 != -INFINITY) den += exp2f(sink2 - M2);
  const float inv = 1.0f / den;
  e0 *= inv;
  e1 *= inv;

  float4 acc[NV];
#pragma unroll
  for (int v = 0; v < NV; ++v) acc[v] = make_float4(0.f, 0.f, 0.f, 0.f);
  const float* base = L.part_out + row * D + lane * 4;
#pragma unroll 4
  for (int s = 0; s < S; ++s) {
    const float w = __shfl_sync(0xffffffffu, s < 32 ? e0 : e1, s & 31);
#pragma unroll
    for (int v = 0; v < NV; ++v) {
      if (v * 128 + lane * 4 < D) {
        // Empty splits wrote zeros here, so the unconditional read is always initialized.
        const float4 x = *reinterpret_cast<const float4*>(base + s * ss * D + v * 128);
        acc[v].x += w * x.x;
        acc[v].y += w * x.y;
        acc[v].z += w * x.z;
        acc[v].w += w * x.w;
      }
    }
  }
#pragma unroll
  for (int v = 0; v < NV; ++v) {
    const int d = v * 128 + lane * 4;
    if (d < D) store4(p.out, row * D + d, p.out_dtype, acc[v]);
  }
  if (lane == 0) p.lse[row] = (M2 + log2f(den)) * kLn2;
}

}  // namespace

cudaError_t launch_attn_merge(const AttnLaunch& L, cudaStream_t stream) {
  const int64_t rows = L.p.max_q_len * L.p.num_q_heads;
  const dim3 grid(unsigned((rows + kMergeWarps - 1) / kMergeWarps), unsigned(L.p.batch));
  switch (L.p.head_dim) {
    case 64: attn_merge_kernel<64><<<grid, kMergeWarps * 32, 0, stream>>>(L); break;
    case 128: attn_merge_kernel<128><<<grid, kMergeWarps * 32, 0, stream>>>(L); break;
    case 256: attn_merge_kernel<256><<<grid, kMergeWarps * 32, 0, stream>>>(L); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace jpa
