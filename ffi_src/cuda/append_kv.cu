// append_kv: scatter new K/V tokens into their page slots. One thread per (token, KV head,
// 8-element chunk of head_dim): reads the strided source in place (16-byte loads when the view
// allows), divides by the scale, rounds to the page dtype exactly like the CPU path
// (common/dtypes.h: round to nearest even, fp8 saturating at +-448) and writes 16 bytes
// (8 bytes for fp8). Tokens whose slot is negative or past the cache are skipped.
#include <cstdint>

#include "../common/dtypes.h"
#include "../common/params.h"
#include "cuda_utils.cuh"
#include "launchers.h"

namespace jpa {
namespace {

constexpr int kAppendThreads = 256;
constexpr int kChunk = 8;

// Load elements [e, e + 8) of a token view as floats (n < 8 at a ragged head_dim end).
__device__ __forceinline__ void load_chunk(const TokenView& t, int64_t e, int n, bool vec,
                                           float (&x)[kChunk]) {
  if (vec && n == kChunk) {
    if (t.dtype == DType::kF32) {
      const float4* s = reinterpret_cast<const float4*>(static_cast<const float*>(t.ptr) + e);
      const float4 a = s[0], c = s[1];
      x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
      x[4] = c.x; x[5] = c.y; x[6] = c.z; x[7] = c.w;
    } else {
      const uint4 u = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(t.ptr) + e);
      const uint32_t w[4] = {u.x, u.y, u.z, u.w};
      const bool bf = t.dtype == DType::kBF16;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint16_t lo = uint16_t(w[k] & 0xffffu), hi = uint16_t(w[k] >> 16);
        x[2 * k] = bf ? bf16_to_float(lo) : f16_to_float(lo);
        x[2 * k + 1] = bf ? bf16_to_float(hi) : f16_to_float(hi);
      }
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < kChunk; ++k) x[k] = k < n ? load_as_float(t.ptr, e + k, t.dtype) : 0.0f;
}

// Store x / scale (rounded to the page dtype) at page elements [e, e + n).
__device__ __forceinline__ void store_chunk(void* base, DType dt, int64_t e, int n, bool vec,
                                            const float (&x)[kChunk], float scale) {
  float y[kChunk];
#pragma unroll
  for (int k = 0; k < kChunk; ++k) y[k] = x[k] / scale;
  if (vec && n == kChunk) {
    if (dt == DType::kBF16 || dt == DType::kF16) {
      uint32_t w[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint16_t lo = dt == DType::kBF16 ? float_to_bf16(y[2 * k]) : float_to_f16(y[2 * k]);
        const uint16_t hi =
            dt == DType::kBF16 ? float_to_bf16(y[2 * k + 1]) : float_to_f16(y[2 * k + 1]);
        w[k] = uint32_t(lo) | (uint32_t(hi) << 16);
      }
      *reinterpret_cast<uint4*>(static_cast<uint16_t*>(base) + e) = make_uint4(w[0], w[1], w[2], w[3]);
      return;
    }
    if (dt == DType::kF8E4M3) {
      uint32_t w[2] = {0u, 0u};
#pragma unroll
      for (int k = 0; k < kChunk; ++k) {
        // float_to_f8e4m3 saturates at +-448 (the clip of the semantics) and keeps NaN.
        w[k / 4] |= uint32_t(float_to_f8e4m3(y[k])) << (8 * (k % 4));
      }
      *reinterpret_cast<uint2*>(static_cast<uint8_t*>(base) + e) = make_uint2(w[0], w[1]);
      return;
    }
    if (dt == DType::kF32) {
      float4* d = reinterpret_cast<float4*>(static_cast<float*>(base) + e);
      d[0] = make_float4(y[0], y[1], y[2], y[3]);
      d[1] = make_float4(y[4], y[5], y[6], y[7]);
      return;
    }
  }
  for (int k = 0; k < n; ++k) store_from_float(base, e + k, dt, y[k]);
}

__global__ void __launch_bounds__(kAppendThreads) append_kv_kernel(
    const __grid_constant__ AppendParams p, int64_t total, int chunks, bool k_vec, bool v_vec,
    bool page_vec) {
  const int64_t heads = p.kv.num_heads;
  const int64_t capacity = p.kv.num_pages * p.kv.page_size;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int c = int(idx % chunks);
    const int64_t th = idx / chunks;
    const int64_t head = th % heads;
    const int64_t tok = th / heads;
    const int64_t slot = p.slot_mapping[tok];
    if (slot < 0 || slot >= capacity) continue;
    const int64_t page = slot / p.kv.page_size;
    const int64_t off = slot - page * p.kv.page_size;
    const int64_t d0 = int64_t(c) * kChunk;
    const int n = int(p.head_dim - d0 < kChunk ? p.head_dim - d0 : kChunk);
    const int64_t dst = page * p.kv.page_stride + off * p.kv.slot_stride + head * p.kv.head_stride + d0;
    float x[kChunk];
    load_chunk(p.k, tok * p.k.stride_tok + head * p.k.stride_head + d0, n, k_vec, x);
    store_chunk(p.kv.k, p.kv.dtype, dst, n, page_vec, x, p.scales[0]);
    load_chunk(p.v, tok * p.v.stride_tok + head * p.v.stride_head + d0, n, v_vec, x);
    store_chunk(p.kv.v, p.kv.dtype, dst, n, page_vec, x, p.scales[1]);
  }
}

bool is_float_dtype(DType t) {
  return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16;
}

// Whole 8-element chunks of a view can be read with 16-byte loads.
bool view_vectorizable(const TokenView& t, int64_t head_dim) {
  const int64_t eb = dtype_bytes(t.dtype);
  return head_dim % kChunk == 0 && reinterpret_cast<uintptr_t>(t.ptr) % 16 == 0 &&
         (t.stride_tok * eb) % 16 == 0 && (t.stride_head * eb) % 16 == 0;
}

}  // namespace

cudaError_t LaunchAppendKV(const AppendParams& p, cudaStream_t stream) {
  if (!is_float_dtype(p.k.dtype) || !is_float_dtype(p.v.dtype)) return cudaErrorInvalidValue;
  const DType pd = p.kv.dtype;
  if (!is_float_dtype(pd) && pd != DType::kF8E4M3) return cudaErrorInvalidValue;
  if (p.kv.page_size <= 0 || p.head_dim <= 0) return cudaErrorInvalidValue;
  const int chunks = int((p.head_dim + kChunk - 1) / kChunk);
  const int64_t total = p.num_tokens * p.kv.num_heads * chunks;
  if (total == 0) return cudaSuccess;
  const int64_t pb = dtype_bytes(pd);
  // Page stores of a whole chunk are 16 bytes (8 for fp8): every stride is a multiple of
  // head_dim, so alignment follows from the base pointers and head_dim % 8 == 0.
  const bool page_vec = p.head_dim % kChunk == 0 &&
                        reinterpret_cast<uintptr_t>(p.kv.k) % (kChunk * pb) == 0 &&
                        reinterpret_cast<uintptr_t>(p.kv.v) % (kChunk * pb) == 0 &&
                        (p.kv.slot_stride * pb) % (kChunk * pb) == 0 &&
                        (p.kv.head_stride * pb) % (kChunk * pb) == 0 &&
                        (p.kv.page_stride * pb) % (kChunk * pb) == 0;
  int64_t blocks = (total + kAppendThreads - 1) / kAppendThreads;
  if (blocks > 65536) blocks = 65536;  // grid-stride loop covers the rest
  append_kv_kernel<<<unsigned(blocks), kAppendThreads, 0, stream>>>(
      p, total, chunks, view_vectorizable(p.k, p.head_dim), view_vectorizable(p.v, p.head_dim),
      page_vec);
  return cudaGetLastError();
}

}  // namespace jpa
