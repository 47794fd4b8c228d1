// The attention tile kernel (tensor cores, mma.sync m16n8k16) shared by decode and prefill.
//
// One CTA = (KV split, KV head, request, block of BM packed query rows). A packed row is a
// (token i of the request, query head g of the KV head's group) pair, r = i * G + g, so the
// CTA serves the whole GQA group from each K/V tile it reads. Warps form a WM x WN grid:
// warp (wm, wn) owns rows [16 wm, 16 wm + 16) of the block and keys [wn KW, wn KW + KW) of
// every key tile (decode uses WM = 1, WN > 1: the warps split the keys; prefill WM = 4, WN = 1).
//
// Per key tile (BN keys): cp.async 16-byte copies gather the keys' rows from their pages
// (2 stages, the next tile in flight while this one is used); fp8 pages are then widened to
// fp16 in shared memory; S = Q K^T by MMA, scale / soft cap / mask in fp32, online softmax
// (log2 domain), O += P V by MMA with P rounded to the compute dtype. Key tiles wholly outside
// the causal/window range of the block are never visited; tiles wholly inside skip masking.
//
// The key range [kb, ke) a CTA visits lies inside [first_needed_key, kv_len) of its request,
// whose pages the prepare kernel has checked, so every page index dereferenced is in range.
#pragma once

#include <cmath>
#include <cstdint>

#include "../common/mask.h"
#include "attn_common.cuh"
#include "cuda_utils.cuh"

namespace jpa {
namespace cuda {

// Launch facts of one kernel configuration on the current device.
struct TileInfo {
  int threads = 0;
  int smem_bytes = 0;
  int block_rows = 0;   // BM
  int ctas_per_sm = 0;  // from the occupancy calculator
};

template <int D_, int WM_, int WN_, int BN_, typename CT_, bool kFp8_>
struct TileCfg {
  static constexpr int D = D_;
  static constexpr int WM = WM_;
  static constexpr int WN = WN_;
  static constexpr int BN = BN_;
  using CT = CT_;
  static constexpr bool kFp8 = kFp8_;

  static constexpr int kThreads = 32 * WM * WN;
  static constexpr int BM = 16 * WM;
  static constexpr int KW = BN / WN;  // keys per warp per tile
  static_assert(KW % 16 == 0, "each warp needs whole k16 steps of keys");
  static_assert(D % 64 == 0, "head_dim must be a multiple of 64 (8 swizzled 16-byte chunks)");
  static constexpr int kPageBytes = kFp8 ? 1 : 2;
  static constexpr int kRawRow = D * kPageBytes;  // bytes of one stored key row
  static constexpr int kRawChunks = kRawRow / 16;
  static_assert(kThreads % kRawChunks == 0, "a thread keeps one chunk column while loading");
  static constexpr int kStages = 2;
  static constexpr int kTileRow = D * 2;  // bytes of one row in the compute dtype
  static constexpr int kQBytes = BM * kTileRow;
  static constexpr int kRawTile = BN * kRawRow;  // K (or V) of one stage
  static constexpr int kStageBytes = 2 * kRawTile;
  static constexpr int kConvBytes = kFp8 ? 2 * BN * kTileRow : 0;
  static constexpr int kRedStride = D + 8;  // floats per row of the epilogue buffer
  static constexpr int kRedBytes = WN * BM * kRedStride * 4 + 2 * WN * BM * 4;
  static constexpr int kMainBytes = kStages * kStageBytes + kConvBytes;
  static constexpr int kSmemBytes = kQBytes + (kMainBytes > kRedBytes ? kMainBytes : kRedBytes);
};

// Byte offset of 16-byte chunk `chunk` of row `row` in a [rows][D] compute-dtype tile whose
// chunks are XOR-swizzled by row so that ldmatrix reads of 8 rows hit 8 distinct bank groups.
template <int D>
__device__ __forceinline__ uint32_t swz(int row, int chunk) {
  return uint32_t(row * (D * 2) + ((chunk ^ (row & 7)) << 4));
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

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads) attn_tile_kernel(const __grid_constant__ AttnLaunch L) {
  using CT = typename Cfg::CT;
  constexpr int D = Cfg::D, BM = Cfg::BM, BN = Cfg::BN, KW = Cfg::KW, WM = Cfg::WM;
  constexpr int NT = Cfg::kThreads;
  extern __shared__ __align__(128) unsigned char smem[];

  const AttnParams& p = L.p;
  const int S = L.num_splits;
  const int split = blockIdx.x % S;
  const int kvh = blockIdx.x / S;
  const int b = blockIdx.y;
  const int rb = L.row_blocks - 1 - int(blockIdx.z);  // heaviest (latest) row blocks first

  const ReqMeta meta = L.meta[b];
  if (meta.status != kReqValid || meta.q_len == 0) return;
  const int G = L.group;
  const int rows_total = meta.q_len * G;
  const int r0 = rb * BM;
  if (r0 >= rows_total) return;

  const int tid = threadIdx.x;
  const int kv_len = meta.kv_len;
  const int q_len = meta.q_len;
  const int64_t window = p.window_left;
  const bool causal = p.causal;

  // Key range of the block: the union of its rows' visible ranges.
  const int r_end = min(r0 + BM, rows_total);
  const int pos_first = kv_len - q_len + r0 / G;
  const int pos_last = kv_len - q_len + (r_end - 1) / G;
  int klo = 0;
  if (window >= 0) klo = int(max(int64_t(0), int64_t(pos_first) - window));
  int khi = causal ? min(kv_len, pos_last + 1) : kv_len;
  if (khi < klo) khi = klo;
  // This split's share, whole tiles each.
  const int64_t n_keys = khi - klo;
  int64_t per = (n_keys + S - 1) / S;
  per = (per + BN - 1) / BN * BN;
  const int kb = int(min(int64_t(khi), klo + per * split));
  const int ke = int(min(int64_t(khi), int64_t(kb) + per));
  const int ntiles = (ke - kb + BN - 1) / BN;

  // ---- stage Q: BM packed rows x D, compute dtype, swizzled ----
  {
    const int qbytes = dtype_bytes(p.q.dtype);
    static_assert((BM * (D / 8)) % NT == 0, "Q staging loop");
#pragma unroll 2
    for (int it = 0; it < BM * (D / 8) / NT; ++it) {
      const int idx = tid + it * NT;
      const int r = idx / (D / 8), c = idx % (D / 8);
      const int R = r0 + r;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (R < rows_total) {
        const int64_t tok = meta.row_begin + R / G;
        const int64_t head = int64_t(kvh) * G + R % G;
        const int64_t e = tok * p.q.stride_tok + head * p.q.stride_head + c * 8;
        if (L.q_vec) {
          v = *reinterpret_cast<const uint4*>(static_cast<const char*>(p.q.ptr) + e * qbytes);
        } else {
          uint32_t w[4];
#pragma unroll
          for (int k = 0; k < 4; ++k)
            w[k] = TypeTraits<CT>::pack(load_as_float(p.q.ptr, e + 2 * k, p.q.dtype),
                                        load_as_float(p.q.ptr, e + 2 * k + 1, p.q.dtype));
          v = make_uint4(w[0], w[1], w[2], w[3]);
        }
      }
      *reinterpret_cast<uint4*>(smem + swz<D>(r, c)) = v;
    }
  }

  // ---- K/V tile loader ----
  const int32_t* bt_row = p.block_tables + int64_t(b) * p.max_pages_per_req;
  const int page_size = int(p.kv.page_size);
  const int page_shift = L.page_shift;
  const int64_t head_off = int64_t(kvh) * p.kv.head_stride;
  const char* k_src = static_cast<const char*>(p.kv.k);
  const char* v_src = static_cast<const char*>(p.kv.v);
  const uint32_t smem_base = smem_addr(smem);
  const uint32_t stage_base = smem_base + Cfg::kQBytes;

  auto issue_tile = [&](int stage, int j0) {
    const uint32_t dst0 = stage_base + stage * Cfg::kStageBytes;
    constexpr int kKeysPerPass = NT / Cfg::kRawChunks;
    static_assert(BN % kKeysPerPass == 0, "loader loop");
    const int ch = tid % Cfg::kRawChunks;
#pragma unroll 4
    for (int it = 0; it < BN / kKeysPerPass; ++it) {
      const int key = tid / Cfg::kRawChunks + it * kKeysPerPass;
      const int j = j0 + key;
      const char* ks = k_src;
      const char* vs = v_src;
      int bytes = 0;
      if (j < ke) {
        int pi, slot;
        if (page_shift >= 0) {
          pi = j >> page_shift;
          slot = j & (page_size - 1);
        } else {
          pi = j / page_size;
          slot = j - pi * page_size;
        }
        const int64_t off = (int64_t(bt_row[pi]) * p.kv.page_stride +
                             int64_t(slot) * p.kv.slot_stride + head_off) *
                                Cfg::kPageBytes +
                            ch * 16;
        ks += off;
        vs += off;
        bytes = 16;
      }
      const uint32_t d = Cfg::kFp8 ? dst0 + key * Cfg::kRawRow + ch * 16 : dst0 + swz<D>(key, ch);
      cp_async_16(d, ks, bytes);
      cp_async_16(d + Cfg::kRawTile, vs, bytes);
    }
  };

  // ---- per-thread state ----
  const int warp = tid >> 5, lane = tid & 31;
  const int wm = warp % WM, wn = warp / WM;
  const int g = lane >> 2, tig = lane & 3;
  int pos_r[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int R = min(r0 + wm * 16 + g + 8 * h, rows_total - 1);
    pos_r[h] = kv_len - q_len + R / G;
  }
  const float qk_scale = p.sm_scale * p.scales[0];
  const float v_scale = p.scales[1];
  const bool use_cap = p.softcap > 0.0f;
  const float scale_log2 = qk_scale * kLog2e;
  const float cap_in = use_cap ? qk_scale / p.softcap : 0.0f;
  const float cap_out = p.softcap * kLog2e;

  float o_acc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o_acc[i][0] = o_acc[i][1] = o_acc[i][2] = o_acc[i][3] = 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_run[2] = {0.0f, 0.0f};

  const uint32_t conv_base = stage_base + Cfg::kStages * Cfg::kStageBytes;

  if (ntiles > 0) issue_tile(0, kb);
  cp_async_commit();

  for (int t = 0; t < ntiles; ++t) {
    const int j0 = kb + t * BN;
    if (t + 1 < ntiles) issue_tile((t + 1) & 1, j0 + BN);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    uint32_t k_base, v_base;
    if constexpr (Cfg::kFp8) {
      // Widen the raw fp8 stage into the fp16 tiles (swizzled like the 16-bit path).
      const unsigned char* raw = smem + Cfg::kQBytes + (t & 1) * Cfg::kStageBytes;
      unsigned char* conv = smem + (conv_base - smem_base);
      static_assert((2 * BN * Cfg::kRawChunks) % NT == 0, "fp8 widening loop");
#pragma unroll 2
      for (int it = 0; it < 2 * BN * Cfg::kRawChunks / NT; ++it) {
        const int idx = tid + it * NT;
        const int kvsel = idx / (BN * Cfg::kRawChunks);
        const int rem = idx % (BN * Cfg::kRawChunks);
        const int key = rem / Cfg::kRawChunks, ch = rem % Cfg::kRawChunks;
        const uint4 in = *reinterpret_cast<const uint4*>(raw + kvsel * Cfg::kRawTile +
                                                         key * Cfg::kRawRow + ch * 16);
        uint4 o0, o1;
        o0.x = fp8x2_to_f16x2(in.x);
        o0.y = fp8x2_to_f16x2(in.x >> 16);
        o0.z = fp8x2_to_f16x2(in.y);
        o0.w = fp8x2_to_f16x2(in.y >> 16);
        o1.x = fp8x2_to_f16x2(in.z);
        o1.y = fp8x2_to_f16x2(in.z >> 16);
        o1.z = fp8x2_to_f16x2(in.w);
        o1.w = fp8x2_to_f16x2(in.w >> 16);
        unsigned char* dst = conv + kvsel * (BN * Cfg::kTileRow);
        *reinterpret_cast<uint4*>(dst + swz<D>(key, 2 * ch)) = o0;
        *reinterpret_cast<uint4*>(dst + swz<D>(key, 2 * ch + 1)) = o1;
      }
      __syncthreads();
      k_base = conv_base;
      v_base = conv_base + BN * Cfg::kTileRow;
    } else {
      k_base = stage_base + (t & 1) * Cfg::kStageBytes;
      v_base = k_base + Cfg::kRawTile;
    }

    // ---- S = Q K^T for this warp's 16 rows x KW keys ----
    float s_acc[KW / 8][4];
#pragma unroll
    for (int i = 0; i < KW / 8; ++i) s_acc[i][0] = s_acc[i][1] = s_acc[i][2] = s_acc[i][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, smem_base + swz<D>(wm * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                        2 * kk + (lane >> 4)));
#pragma unroll
      for (int nt2 = 0; nt2 < KW / 16; ++nt2) {
        uint32_t bfr[4];
        ldmatrix_x4(bfr, k_base + swz<D>(wn * KW + nt2 * 16 + (lane & 7) + ((lane >> 4) & 1) * 8,
                                         2 * kk + ((lane >> 3) & 1)));
        mma_16816<CT>(s_acc[2 * nt2], a, bfr[0], bfr[1]);
        mma_16816<CT>(s_acc[2 * nt2 + 1], a, bfr[2], bfr[3]);
      }
    }

    // ---- logits (log2 domain), mask, online softmax ----
    const bool full = (j0 + BN <= ke) && (!causal || j0 + BN - 1 <= pos_first) &&
                      (window < 0 || int64_t(pos_last) - j0 <= window);
    const int jw = j0 + wn * KW;
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < KW / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s_acc[nt][e];
        x = use_cap ? cap_out * tanhf(x * cap_in) : x * scale_log2;
        if (!full) {
          const int j = jw + nt * 8 + tig * 2 + (e & 1);
          if (!(j < ke && key_visible(pos_r[e >> 1], j, causal, window))) x = -INFINITY;
        }
        s_acc[nt][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    }
    float m_use[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
      const float m_new = fmaxf(m_run[h], mx[h]);
      m_use[h] = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = exp2f(m_run[h] - m_use[h]);
      m_run[h] = m_new;
      l_run[h] *= alpha;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        o_acc[dt][2 * h] *= alpha;
        o_acc[dt][2 * h + 1] *= alpha;
      }
    }
#pragma unroll
    for (int nt = 0; nt < KW / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pr = exp2f(s_acc[nt][e] - m_use[e >> 1]);
        l_run[e >> 1] += pr;
        s_acc[nt][e] = pr;
      }
    }

    // ---- O += P V ----
#pragma unroll
    for (int kk = 0; kk < KW / 16; ++kk) {
      uint32_t a[4];
      a[0] = TypeTraits<CT>::pack(s_acc[2 * kk][0], s_acc[2 * kk][1]);
      a[1] = TypeTraits<CT>::pack(s_acc[2 * kk][2], s_acc[2 * kk][3]);
      a[2] = TypeTraits<CT>::pack(s_acc[2 * kk + 1][0], s_acc[2 * kk + 1][1]);
      a[3] = TypeTraits<CT>::pack(s_acc[2 * kk + 1][2], s_acc[2 * kk + 1][3]);
#pragma unroll
      for (int dt2 = 0; dt2 < D / 16; ++dt2) {
        uint32_t bfr[4];
        ldmatrix_x4_trans(bfr, v_base + swz<D>(wn * KW + kk * 16 + (lane & 7) +
                                                    ((lane >> 3) & 1) * 8,
                                                2 * dt2 + (lane >> 4)));
        mma_16816<CT>(o_acc[2 * dt2], a, bfr[0], bfr[1]);
        mma_16816<CT>(o_acc[2 * dt2 + 1], a, bfr[2], bfr[3]);
      }
    }
    __syncthreads();  // this stage (and the fp8 tiles) may be overwritten next
  }

  // ---- epilogue: combine the WN key-slices of each row, normalize, write ----
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 1);
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 2);
  }
  cp_async_wait<0>();
  __syncthreads();
  float* red_o = reinterpret_cast<float*>(smem + Cfg::kQBytes);
  float* red_m = red_o + Cfg::WN * BM * Cfg::kRedStride;
  float* red_l = red_m + Cfg::WN * BM;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = wm * 16 + g + 8 * h;
    float* dst = red_o + (wn * BM + row) * Cfg::kRedStride + tig * 2;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
      *reinterpret_cast<float2*>(dst + dt * 8) = make_float2(o_acc[dt][2 * h], o_acc[dt][2 * h + 1]);
    if (tig == 0) {
      red_m[wn * BM + row] = m_run[h];
      red_l[wn * BM + row] = l_run[h];
    }
  }
  __syncthreads();

  const int64_t Hq = p.num_q_heads;
  static_assert((BM * (D / 4)) % NT == 0, "epilogue loop");
  for (int it = 0; it < BM * (D / 4) / NT; ++it) {
    const int idx = tid + it * NT;
    const int row = idx / (D / 4), c4 = idx % (D / 4);
    const int R = r0 + row;
    if (R >= rows_total) continue;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < Cfg::WN; ++w) M = fmaxf(M, red_m[w * BM + row]);
    float lsum = 0.0f;
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
    if (M != -INFINITY) {
#pragma unroll
      for (int w = 0; w < Cfg::WN; ++w) {
        const float sc = exp2f(red_m[w * BM + row] - M);
        lsum += red_l[w * BM + row] * sc;
        const float4 v = *reinterpret_cast<const float4*>(red_o + (w * BM + row) * Cfg::kRedStride +
                                                          c4 * 4);
        o.x += v.x * sc;
        o.y += v.y * sc;
        o.z += v.z * sc;
        o.w += v.w * sc;
      }
    }
    const int64_t tok = meta.row_begin + R / G;
    const int64_t head = int64_t(kvh) * G + R % G;
    const int64_t row_id = tok * Hq + head;
    if (S == 1) {
      float lse_nat = -INFINITY;
      float f = 0.0f;
      if (lsum > 0.0f) {
        float lse2 = M + log2f(lsum);
        if (p.sinks != nullptr) {
          const float sink2 = p.sinks[head] * kLog2e;
          const float mm = fmaxf(lse2, sink2);
          lse2 = mm + log2f(exp2f(lse2 - mm) + exp2f(sink2 - mm));
        }
        f = exp2f(M - lse2) * v_scale;
        lse_nat = lse2 * kLn2;
      }
      store4(p.out, row_id * D + c4 * 4, p.out_dtype,
             make_float4(o.x * f, o.y * f, o.z * f, o.w * f));
      if (c4 == 0) p.lse[row_id] = lse_nat;
    } else {
      const int64_t prow = int64_t(split) * p.num_tokens * Hq + row_id;
      if (lsum > 0.0f) {
        const float lse2 = M + log2f(lsum);
        const float f = exp2f(M - lse2) * v_scale;
        *reinterpret_cast<float4*>(L.part_out + prow * D + c4 * 4) =
            make_float4(o.x * f, o.y * f, o.z * f, o.w * f);
        if (c4 == 0) L.part_lse[prow] = lse2;
      } else if (c4 == 0) {
        L.part_lse[prow] = -INFINITY;  // empty split: the merge skips its output
      }
    }
  }
}

// Launch helpers for one configuration. info() is cached per device by the caller.
template <class Cfg>
struct TileRunner {
  static cudaError_t info(TileInfo* ti) {
    auto* fn = attn_tile_kernel<Cfg>;
    JPA_CUDA_TRY(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      Cfg::kSmemBytes));
    int occ = 0;
    JPA_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, fn, Cfg::kThreads,
                                                               Cfg::kSmemBytes));
    ti->threads = Cfg::kThreads;
    ti->smem_bytes = Cfg::kSmemBytes;
    ti->block_rows = Cfg::BM;
    ti->ctas_per_sm = occ;
    return cudaSuccess;
  }
  static cudaError_t launch(const AttnLaunch& L, dim3 grid, cudaStream_t stream) {
    attn_tile_kernel<Cfg><<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(L);
    return cudaGetLastError();
  }
};

// Per-head_dim entry points (one .cu file each, so the instantiations compile in parallel).
// `decode_shape`: the block holds at most 16 packed rows (WM = 1, warps split keys).
// `page_dtype` picks the compute dtype: bf16 pages -> bf16, f16 and fp8 pages -> f16.
// With `L == nullptr` only fills `info` (also sets the kernel's shared-memory limit).
cudaError_t attn_tiles_d64(const AttnLaunch* L, bool decode_shape, DType page_dtype,
                           TileInfo* info, dim3 grid, cudaStream_t stream);
cudaError_t attn_tiles_d128(const AttnLaunch* L, bool decode_shape, DType page_dtype,
                            TileInfo* info, dim3 grid, cudaStream_t stream);
cudaError_t attn_tiles_d256(const AttnLaunch* L, bool decode_shape, DType page_dtype,
                            TileInfo* info, dim3 grid, cudaStream_t stream);

// Dispatch over (shape, page dtype) for one head_dim; used by the attn_d*.cu files.
template <int D, int DecWN, int DecBN, int PreBN>
cudaError_t attn_tiles_dispatch(const AttnLaunch* L, bool decode_shape, DType page_dtype,
                                TileInfo* info, dim3 grid, cudaStream_t stream) {
  auto run = [&](auto runner) -> cudaError_t {
    using R = decltype(runner);
    if (L == nullptr) return R::info(info);
    return R::launch(*L, grid, stream);
  };
  if (decode_shape) {
    switch (page_dtype) {
      case DType::kBF16: return run(TileRunner<TileCfg<D, 1, DecWN, DecBN, __nv_bfloat16, false>>{});
      case DType::kF16: return run(TileRunner<TileCfg<D, 1, DecWN, DecBN, __half, false>>{});
      case DType::kF8E4M3: return run(TileRunner<TileCfg<D, 1, DecWN, DecBN, __half, true>>{});
      default: return cudaErrorInvalidValue;
    }
  }
  switch (page_dtype) {
    case DType::kBF16: return run(TileRunner<TileCfg<D, 4, 1, PreBN, __nv_bfloat16, false>>{});
    case DType::kF16: return run(TileRunner<TileCfg<D, 4, 1, PreBN, __half, false>>{});
    case DType::kF8E4M3: return run(TileRunner<TileCfg<D, 4, 1, PreBN, __half, true>>{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace jpa
