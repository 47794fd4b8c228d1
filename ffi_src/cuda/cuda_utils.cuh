// Small CUDA building blocks shared by the kernels of this directory: error checking, cached
// device properties, 16-bit element types, fp8 -> f16 conversion, and thin inline-PTX
// wrappers (cp.async, shared loads / stores, ldmatrix, mma.sync m16n8k16). Knows no XLA type.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

#include "../common/dtypes.h"

// Return the first CUDA error from a runtime call (used in host launch code).
#define JPA_CUDA_TRY(expr)                     \
  do {                                         \
    cudaError_t jpa_err_ = (expr);             \
    if (jpa_err_ != cudaSuccess) return jpa_err_; \
  } while (0)

// After a kernel launch: report configuration/launch errors right away.
#define JPA_CHECK_LAUNCH() JPA_CUDA_TRY(cudaGetLastError())

namespace jpa {
namespace cuda {

// Per-device facts read once per process and device (no device memory is touched).
struct DeviceInfo {
  int num_sms = 0;
  int max_smem_optin = 0;  // bytes of dynamic shared memory a block may opt into
  int cc_major = 0;        // compute capability (9.0 on Hopper): picks the kernel family
  int cc_minor = 0;
};

// Kernel families: sm80 (ffi_src/cuda/sm80/) is portable (mma.sync, cp.async; built for
// sm_80 and sm_90); sm90 (ffi_src/cuda/sm90/) is Hopper's (wgmma; sm_90a only).
enum class Family { kSm80, kSm90 };

// Facts about the current device (cudaGetDevice), cached after the first call.
cudaError_t current_device_info(DeviceInfo* info, int* device);

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- 16-bit compute types --------------------------------------------------------------------

template <typename T>
struct TypeTraits;

template <>
struct TypeTraits<__nv_bfloat16> {
  static constexpr DType kDType = DType::kBF16;
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ uint16_t from_float(float x) {
    __nv_bfloat16 v = __float2bfloat16_rn(x);
    return *reinterpret_cast<uint16_t*>(&v);
  }
};

template <>
struct TypeTraits<__half> {
  static constexpr DType kDType = DType::kF16;
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ uint16_t from_float(float x) {
    __half v = __float2half_rn(x);
    return *reinterpret_cast<uint16_t*>(&v);
  }
};

// fp8 e4m3 -> float, exactly (every e4m3 value is representable in fp16 and bf16 too).
__device__ __forceinline__ float fp8_to_float(uint32_t b) {
  return f8e4m3_to_float(static_cast<uint8_t>(b & 0xffu));
}

// Max / sum over the 32 lanes of a warp, every lane getting the result.
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// acc += w * x, element by element.
__device__ __forceinline__ void fma4(float4& acc, float w, const float4& x) {
  acc.x += w * x.x;
  acc.y += w * x.y;
  acc.z += w * x.z;
  acc.w += w * x.w;
}

// ---- PTX wrappers ------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; src_bytes 0 zero-fills the destination without reading.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}

// atomicAdd with acquire-release semantics at GPU scope: the release half orders the
// caller's CTA's earlier writes (made visible to it by a preceding __syncthreads) before the
// add; the acquire half orders the caller's later reads after it (other threads of the CTA
// follow through a barrier). Lighter than __threadfence (fence.sc) in every thread.
__device__ __forceinline__ int atomic_add_acq_rel_gpu(int* p, int v) {
  int old;
  asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;\n"
               : "=r"(old)
               : "l"(p), "r"(v)
               : "memory");
  return old;
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// 16-byte shared memory load / store at a shared-window address (fp8 staging, sm90).
__device__ __forceinline__ uint4 ld_shared_16(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr)
               : "memory");
  return v;
}

__device__ __forceinline__ void st_shared_16(uint32_t addr, uint4 v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v.x), "r"(v.y),
               "r"(v.z), "r"(v.w)
               : "memory");
}

// Two fp8 e4m3 values (low byte first) -> packed f16x2, exact for every finite value.
__device__ __forceinline__ uint32_t fp8x2_to_f16x2(uint32_t two) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  uint32_t out;
  uint16_t in = static_cast<uint16_t>(two & 0xffffu);
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;\n" : "=r"(out) : "h"(in));
  return out;
#else
  // Place sign/exponent/mantissa bits into f16 (value scaled by 2^-8), then multiply by 2^8.
  uint32_t lo = ((two & 0x7fu) << 7) | ((two & 0x80u) << 8);
  uint32_t hi = ((two & 0x7f00u) << 15) | ((two & 0x8000u) << 16);
  uint32_t placed = lo | hi;
  __half2 h = *reinterpret_cast<__half2*>(&placed);
  h = __hmul2(h, __float2half2_rn(256.0f));
  return *reinterpret_cast<uint32_t*>(&h);
#endif
}

// Sixteen fp8 e4m3 values (one 16-byte chunk, element 0 in the low byte of x) -> sixteen
// f16 as two 16-byte chunks: lo holds elements 0-7, hi elements 8-15.
__device__ __forceinline__ void fp8x16_to_f16x16(uint4 x, uint4& lo, uint4& hi) {
  lo = make_uint4(fp8x2_to_f16x2(x.x), fp8x2_to_f16x2(x.x >> 16), fp8x2_to_f16x2(x.y),
                  fp8x2_to_f16x2(x.y >> 16));
  hi = make_uint4(fp8x2_to_f16x2(x.z), fp8x2_to_f16x2(x.z >> 16), fp8x2_to_f16x2(x.w),
                  fp8x2_to_f16x2(x.w >> 16));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// D = A * B + D for one m16n8k16 tile, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 2^x with flush-to-zero (one MUFU op); the softmax's arguments are <= 0, -inf gives +0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// ---- output stores -----------------------------------------------------------------------------

// Store 4 consecutive floats as `dt` (bf16 / f16 / f32) at element index i (i % 4 == 0 and the
// buffer 8/16-byte aligned). Rounds to nearest even.
__device__ __forceinline__ void store4(void* base, int64_t i, DType dt, float4 v) {
  if (dt == DType::kF32) {
    *reinterpret_cast<float4*>(static_cast<float*>(base) + i) = v;
  } else if (dt == DType::kBF16) {
    uint2 u;
    u.x = TypeTraits<__nv_bfloat16>::pack(v.x, v.y);
    u.y = TypeTraits<__nv_bfloat16>::pack(v.z, v.w);
    *reinterpret_cast<uint2*>(static_cast<uint16_t*>(base) + i) = u;
  } else {
    uint2 u;
    u.x = TypeTraits<__half>::pack(v.x, v.y);
    u.y = TypeTraits<__half>::pack(v.z, v.w);
    *reinterpret_cast<uint2*>(static_cast<uint16_t*>(base) + i) = u;
  }
}

// Calls f with a value of the C++ type of output dtype `dt` (float, __nv_bfloat16 or
// __half), so that a loop of stores inside f branches on the dtype once, not at every store.
template <class F>
__device__ __forceinline__ void with_out_type(DType dt, F f) {
  if (dt == DType::kF32) {
    f(0.0f);
  } else if (dt == DType::kBF16) {
    f(__nv_bfloat16{});
  } else {
    f(__half{});
  }
}

// Two consecutive outputs at dst (T float, __nv_bfloat16 or __half; 8 / 4-byte aligned).
// Rounds to nearest even.
template <typename T>
__device__ __forceinline__ void store2_as(T* dst, float x, float y) {
  if constexpr (std::is_same<T, float>::value) {
    *reinterpret_cast<float2*>(dst) = make_float2(x, y);
  } else {
    *reinterpret_cast<uint32_t*>(dst) = TypeTraits<T>::pack(x, y);
  }
}

}  // namespace cuda
}  // namespace jpa
