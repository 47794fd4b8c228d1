// Stand-alone check of the sm90 family's MMA building blocks (hopper.cuh, wgmma_ops.cuh) on
// a Hopper GPU: one warpgroup stores random bf16 Q [64 x 128], K and V [64 x 128] in the
// kernel's 128-byte-swizzle layout, computes S = Q K^T (wgmma SS, K-major descriptors) and
// O = P V (P = S rounded to bf16, from registers; V read MN-major), and the host compares
// both with a double-precision product. A second run swaps V's leading and stride byte
// offsets, which must not match: the check can tell the layouts apart.
//
//   nvcc -std=c++17 -gencode=arch=compute_90a,code=sm_90a -I <repo> sm90_wgmma_check.cu
// Prints one line per run and "sm90_wgmma_check: OK" when the kernel's layout matches.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "ffi_src/cuda/sm90/hopper.cuh"
#include "ffi_src/cuda/sm90/wgmma_ops.cuh"

using jpa::cuda::sm90::Wgmma;
using namespace jpa::cuda::sm90;

constexpr int kM = 64, kD = 128, kN = 64;  // rows, head_dim, keys
constexpr int kSmem = 1024 + (kM + 2 * kN) * kD * 2;

#define CHECK(x)                                                                         \
  do {                                                                                   \
    cudaError_t e_ = (x);                                                                \
    if (e_ != cudaSuccess) {                                                             \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      return 2;                                                                          \
    }                                                                                    \
  } while (0)

template <bool kSwapV>
__global__ void check_kernel(const __nv_bfloat16* q, const __nv_bfloat16* k,
                             const __nv_bfloat16* v, float* s_out, float* o_out) {
  extern __shared__ unsigned char raw[];
  const uint32_t raw_addr = static_cast<uint32_t>(__cvta_generic_to_shared(raw));
  const uint32_t q_base = (raw_addr + 1023u) & ~1023u;
  const uint32_t k_base = q_base + kM * kD * 2, v_base = k_base + kN * kD * 2;
  unsigned char* q_tile = raw + (q_base - raw_addr);
  unsigned char* k_tile = q_tile + kM * kD * 2;
  unsigned char* v_tile = k_tile + kN * kD * 2;
  const int tid = threadIdx.x;
  for (int i = tid; i < kM * kD / 8; i += 128)
    *reinterpret_cast<uint4*>(q_tile + sw128_offset(kM, i / (kD / 8), i % (kD / 8))) =
        reinterpret_cast<const uint4*>(q)[i];
  for (int i = tid; i < kN * kD / 8; i += 128) {
    const uint32_t off = sw128_offset(kN, i / (kD / 8), i % (kD / 8));
    *reinterpret_cast<uint4*>(k_tile + off) = reinterpret_cast<const uint4*>(k)[i];
    *reinterpret_cast<uint4*>(v_tile + off) = reinterpret_cast<const uint4*>(v)[i];
  }
  fence_proxy_async_shared();
  __syncthreads();

  float s[kN / 2];
  for (int i = 0; i < kN / 2; ++i) s[i] = 0.0f;
  fence_registers(s);
  wgmma_fence();
  for (int kk = 0; kk < kD / 16; ++kk) {
    const uint32_t col = kk / 4, within = (kk % 4) * 32;
    Wgmma<kN, __nv_bfloat16>::ss(s, sw128_desc(q_base + col * kM * 128 + within, 16, 1024),
                                 sw128_desc(k_base + col * kN * 128 + within, 16, 1024),
                                 kk > 0 ? 1 : 0);
  }
  wgmma_commit();
  wgmma_wait<0>();
  fence_registers(s);
  const int w = tid / 32, g = (tid % 32) / 4, t = tid % 4;
  for (int i = 0; i < kN / 8; ++i)
    for (int e = 0; e < 4; ++e) s_out[(16 * w + g + 8 * (e >> 1)) * kN + 8 * i + 2 * t + (e & 1)] = s[4 * i + e];

  uint32_t pa[kN / 16][4];
  for (int kk = 0; kk < kN / 16; ++kk)
    for (int x = 0; x < 4; ++x) {
      __nv_bfloat162 h = __floats2bfloat162_rn(s[8 * kk + 2 * x], s[8 * kk + 2 * x + 1]);
      pa[kk][x] = *reinterpret_cast<uint32_t*>(&h);
    }
  float o[kD / 2];
  for (int i = 0; i < kD / 2; ++i) o[i] = 0.0f;
  fence_registers(pa);
  fence_registers(o);
  wgmma_fence();
  for (int kk = 0; kk < kN / 16; ++kk) {
    const uint32_t lead = kSwapV ? 1024 : kN * 128, stride = kSwapV ? kN * 128 : 1024;
    Wgmma<kD, __nv_bfloat16>::rs(o, pa[kk], sw128_desc(v_base + kk * 2048, lead, stride), 1);
  }
  wgmma_commit();
  wgmma_wait<0>();
  fence_registers(o);
  for (int i = 0; i < kD / 8; ++i)
    for (int e = 0; e < 4; ++e) o_out[(16 * w + g + 8 * (e >> 1)) * kD + 8 * i + 2 * t + (e & 1)] = o[4 * i + e];
}

static float bf(const __nv_bfloat16& x) { return __bfloat162float(x); }

int main() {
  std::mt19937 gen(7);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<__nv_bfloat16> hq(kM * kD), hk(kN * kD), hv(kN * kD);
  for (auto& x : hq) x = __float2bfloat16(nd(gen));
  for (auto& x : hk) x = __float2bfloat16(nd(gen));
  for (auto& x : hv) x = __float2bfloat16(nd(gen));
  __nv_bfloat16 *dq, *dk, *dv;
  float *ds, *dout;
  CHECK(cudaMalloc(&dq, hq.size() * 2));
  CHECK(cudaMalloc(&dk, hk.size() * 2));
  CHECK(cudaMalloc(&dv, hv.size() * 2));
  CHECK(cudaMalloc(&ds, kM * kN * 4));
  CHECK(cudaMalloc(&dout, kM * kD * 4));
  CHECK(cudaMemcpy(dq, hq.data(), hq.size() * 2, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(dk, hk.data(), hk.size() * 2, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(dv, hv.data(), hv.size() * 2, cudaMemcpyHostToDevice));
  bool kernel_ok = false, swapped_matches = false;
  for (int swap = 0; swap < 2; ++swap) {
    auto fn = swap ? check_kernel<true> : check_kernel<false>;
    CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
    CHECK(cudaMemset(ds, 0xff, kM * kN * 4));  // NaN poison: unwritten outputs show
    CHECK(cudaMemset(dout, 0xff, kM * kD * 4));
    fn<<<1, 128, kSmem>>>(dq, dk, dv, ds, dout);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    std::vector<float> s(kM * kN), o(kM * kD);
    CHECK(cudaMemcpy(s.data(), ds, s.size() * 4, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(o.data(), dout, o.size() * 4, cudaMemcpyDeviceToHost));
    double s_err = 0, s_ref = 0, o_err = 0, o_ref = 0;
    for (int r = 0; r < kM; ++r)
      for (int j = 0; j < kN; ++j) {
        double a = 0;
        for (int d = 0; d < kD; ++d) a += double(bf(hq[r * kD + d])) * bf(hk[j * kD + d]);
        const double x = s[r * kN + j];
        s_err += std::isnan(x) ? 1e30 : (x - a) * (x - a);
        s_ref += a * a;
      }
    for (int r = 0; r < kM; ++r)
      for (int d = 0; d < kD; ++d) {
        double a = 0;  // P as the kernel rounds it: the GPU's S in bf16
        for (int j = 0; j < kN; ++j)
          a += double(bf(__float2bfloat16(s[r * kN + j]))) * bf(hv[j * kD + d]);
        const double x = o[r * kD + d];
        o_err += std::isnan(x) ? 1e30 : (x - a) * (x - a);
        o_ref += a * a;
      }
    const double s_rel = std::sqrt(s_err / s_ref), o_rel = std::sqrt(o_err / o_ref);
    const bool ok = s_rel < 1e-5 && o_rel < 1e-5;
    std::printf("%s: S rel L2 %.2e, O rel L2 %.2e -> %s\n",
                swap ? "V offsets swapped" : "kernel layout    ", s_rel, o_rel,
                ok ? "match" : "no match");
    if (swap) swapped_matches = ok; else kernel_ok = ok;
  }
  if (kernel_ok && !swapped_matches) std::printf("sm90_wgmma_check: OK\n");
  return kernel_ok && !swapped_matches ? 0 : 1;
}
