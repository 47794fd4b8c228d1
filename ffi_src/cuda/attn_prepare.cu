// Per-request bookkeeping before the attention tiles run (one block per request):
//  * row range and validity from request.h (the running maximum of cu_seqlens_q computed by
//    the block), then every needed page index checked against [0, num_pages);
//  * ReqMeta[b] stored in the workspace for the tile and merge kernels;
//  * NaN written to every row of an invalid request (out and lse), and for prefill the padding
//    rows before e[0] (block 0) and from e[B] on (last block) get out 0, lse -inf.
// Only the metadata arrays and this request's block-table row are read. Not launched for decode
// with the 16-row tile shape (the tile kernel then checks requests and pages itself).
#include <climits>
#include <cmath>

#include "../common/mask.h"
#include "../common/request.h"
#include "attn_launch.h"

namespace jpa {
namespace cuda {
namespace {

constexpr int kPrepThreads = 256;

__device__ int block_max_int(int v, int* scratch) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kPrepThreads / 32 ? scratch[lane] : INT_MIN;
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  const int r = scratch[0];
  __syncthreads();
  return r;
}

// out rows [r0, r1) (all heads) := value, lse := lse_value.
__device__ void fill_rows(const AttnParams& p, int64_t r0, int64_t r1, float value,
                          float lse_value) {
  const int64_t per_row = p.num_q_heads * p.head_dim;
  for (int64_t i = r0 * per_row + threadIdx.x; i < r1 * per_row; i += blockDim.x)
    store_from_float(p.out, i, p.out_dtype, value);
  for (int64_t i = r0 * p.num_q_heads + threadIdx.x; i < r1 * p.num_q_heads; i += blockDim.x)
    p.lse[i] = lse_value;
}

__global__ void __launch_bounds__(kPrepThreads) attn_prepare_kernel(
    const __grid_constant__ AttnLaunch L) {
  __shared__ int scratch[32];
  const AttnParams& p = L.p;
  const int64_t b = blockIdx.x;
  const bool has_req = b < p.batch;
  const bool prefill = p.cu_seqlens_q != nullptr;

  int run_max = 0;
  if (prefill && has_req) {
    int m = INT_MIN;
    for (int64_t i = threadIdx.x; i <= b; i += blockDim.x) m = max(m, p.cu_seqlens_q[i]);
    run_max = block_max_int(m, scratch);
  }

  int64_t rows_end = 0;  // e[b + 1] (prefill padding after the last request)
  if (has_req) {
    const RequestInfo r = request_info_with_run_max(p, b, run_max);
    bool ok = r.valid;
    if (ok && r.q_len > 0) {
      const int64_t lo = first_needed_key(r.kv_len, r.q_len, p.window_left);
      const int64_t first = lo / p.kv.page_size;
      const int64_t last = (r.kv_len - 1) / p.kv.page_size;
      const int32_t* bt = p.block_tables + b * p.max_pages_per_req;
      int bad = 0;
#pragma unroll 8
      for (int64_t i = first + threadIdx.x; i <= last; i += blockDim.x)
        bad |= !page_in_range(p.kv, bt[i]);
      ok = !__syncthreads_or(bad);
    }
    if (threadIdx.x == 0) {
      ReqMeta m;
      m.row_begin = int32_t(r.row_begin);
      m.q_len = int32_t(r.q_len);
      m.kv_len = int32_t(r.kv_len);
      m.status = ok ? kReqValid : kReqInvalid;
      L.meta[b] = m;
    }
    if (!ok) fill_rows(p, r.row_begin, r.row_begin + r.q_len, NAN, NAN);
    rows_end = r.row_begin + r.q_len;
  }

  if (prefill) {
    const int64_t e0 = clamp64(p.cu_seqlens_q[0], 0, p.num_tokens);
    if (b == 0) fill_rows(p, 0, e0, 0.0f, -INFINITY);
    if (b == int64_t(gridDim.x) - 1) fill_rows(p, has_req ? rows_end : e0, p.num_tokens, 0.0f,
                                               -INFINITY);
  }
}

}  // namespace

cudaError_t launch_attn_prepare(const AttnLaunch& L, cudaStream_t stream) {
  const unsigned blocks = unsigned(L.p.batch > 0 ? L.p.batch : 1);
  attn_prepare_kernel<<<blocks, kPrepThreads, 0, stream>>>(L);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace jpa
