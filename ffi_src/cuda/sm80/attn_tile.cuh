// The sm80 family's attention tile kernel (tensor cores, mma.sync m16n8k16; portable to
// sm_80 and sm_90), shared by decode and prefill.
//
// One CTA = (KV split, KV head, request, block of BM packed query rows). A packed row is a
// (token i of the request, query head g of the KV head's group) pair, r = i * G + g, so the
// CTA serves the whole GQA group from each K/V tile it reads. Warps form a WM x WN grid:
// warp (wm, wn) owns rows [16 wm, 16 wm + 16) of the block and keys [wn KW, wn KW + KW) of
// every key tile (decode uses WM = 1, WN > 1: the warps split the keys; prefill WM = 4, WN = 1).
//
// Per key tile (BN keys): cp.async 16-byte copies gather the keys' rows from their pages
// (kStages stages: kStages - 1 tiles in flight while one is used); S = Q K^T by MMA, scale /
// soft cap / mask in fp32, online softmax (log2 domain), O += P V by MMA with P rounded to the
// compute dtype. fp8 pages stay fp8 in shared memory: ldmatrix reads byte pairs and the
// fragments are widened to fp16 in registers (see "fp8 fragments" below), so fp8 tiles cost
// half the shared memory and no extra pass or barrier. Key tiles wholly outside
// the causal/window range of the block are never visited; tiles wholly inside skip masking.
//
// The key range [kb, ke) a CTA visits lies inside [first_needed_key, kv_len) of its request.
// Its pages were checked by the prepare kernel, or (decode, AttnLaunch::fused_checks) each
// page index is checked by the loader as its keys are gathered: an index out of range is never
// dereferenced (zero-fill) and turns the CTA's rows into NaN. Either way every page index
// dereferenced is in range.
#pragma once

#include <cmath>
#include <cstdint>

#include "../../common/index.h"
#include "../../common/mask.h"
#include "../../common/request.h"
#include "../attn_common.cuh"
#include "../cuda_utils.cuh"
#include "../tile_families.h"
#include "../kernel_runner.cuh"
#include "../merge_row.cuh"
#include "../tile_work.cuh"
#include "../timeline.cuh"

namespace jpa {
namespace cuda {

template <int D_, int WM_, int WN_, int BN_, typename CT_, bool kFp8_, int MT_ = 1,
          int Stages_ = 2>
struct TileCfg {
  static constexpr int D = D_;
  static constexpr int WM = WM_;
  static constexpr int WN = WN_;
  static constexpr int BN = BN_;
  using CT = CT_;
  static constexpr bool kFp8 = kFp8_;
  static constexpr int MT = MT_;  // 16-row MMA tiles per warp (K/V fragments reused MT times)

  static constexpr int kThreads = 32 * WM * WN;
  static constexpr int BM = 16 * WM * MT;
  static constexpr int KW = BN / WN;  // keys per warp per tile
  static_assert(KW % 16 == 0, "each warp needs whole k16 steps of keys");
  static_assert(D % 64 == 0, "head_dim must be a multiple of 64 (8 swizzled 16-byte chunks)");
  static constexpr int kPageBytes = kFp8 ? 1 : 2;
  static constexpr int kRawRow = D * kPageBytes;  // bytes of one stored key row
  static constexpr int kRawChunks = kRawRow / 16;
  static_assert(kThreads % kRawChunks == 0, "a thread keeps one chunk column while loading");
  static constexpr int kStages = Stages_;  // K/V tiles in flight + the one in use
  // fp8 decode: shared memory allows 4 CTAs per SM, and so must registers (ncu, H100,
  // 128x2048: 158 registers/thread held it to 3 CTAs, 2.59 waves of 1024 CTAs; capped: a few
  // bytes of spill, 209.7 -> 206.1 us).
  static constexpr int kMinCtasPerSm = (kFp8 && WM == 1) ? 4 : 1;
  static_assert(kStages >= 2 && kStages <= 4, "pipeline depth");
  static constexpr int kTileRow = D * 2;  // bytes of one row in the compute dtype
  static constexpr int kQBytes = BM * kTileRow;
  static constexpr int kRawTile = BN * kRawRow;  // K (or V) of one stage
  static constexpr int kStageBytes = 2 * kRawTile;
  static constexpr int kRedStride = D + 8;  // floats per row of the epilogue buffer
  static constexpr int kRedBytes = WN * BM * kRedStride * 4 + 2 * WN * BM * 4;
  static constexpr int kMainBytes = kStages * kStageBytes;
  static constexpr int kSmemBytes = kQBytes + (kMainBytes > kRedBytes ? kMainBytes : kRedBytes);
};

// Byte offset of 16-byte chunk `chunk` of row `row` in a tile of RowBytes-byte rows whose
// chunks are XOR-swizzled by row so that ldmatrix reads of 8 consecutive rows at one chunk
// hit 8 distinct bank groups (rows of 4 chunks: two rows share a 128-byte line, so the XOR
// key changes every other row).
template <int RowBytes>
__device__ __forceinline__ uint32_t swz_row(int row, int chunk) {
  static_assert(RowBytes == 64 || RowBytes % 128 == 0, "row of 4 or a multiple of 8 chunks");
  const int key = RowBytes == 64 ? (row >> 1) & 3 : row & 7;
  return uint32_t(row * RowBytes + ((chunk ^ key) << 4));
}

// The same for a [rows][D] tile of 16-bit elements (Q, and K/V of 16-bit pages).
template <int D>
__device__ __forceinline__ uint32_t swz(int row, int chunk) {
  return swz_row<D * 2>(row, chunk);
}

// ---- fp8 fragments ----
// ldmatrix (b16) over an fp8 tile whose rows are keys hands thread (g = lane / 4, t = lane % 4)
// bytes 4t..4t+3 of key g's 16-byte chunk, i.e. 4 consecutive head_dim values. For S = Q K^T
// they become the m16n8k16 B fragment with the head_dim order permuted inside each 16-wide
// step: k slots 2t, 2t+1 <- d 4t, 4t+1 and slots 2t+8, 2t+9 <- d 4t+2, 4t+3. Q's A fragment
// is loaded with the same permutation (fp8_q_frag), so every dot product is unchanged.
__device__ __forceinline__ void fp8_k_frag(uint32_t x, uint32_t& b0, uint32_t& b1) {
  b0 = fp8x2_to_f16x2(x);
  b1 = fp8x2_to_f16x2(x >> 16);
}

// ldmatrix.trans (b16) over the same tile hands thread (g, t) the byte pairs (d 2g, 2g + 1) of
// keys 2t and 2t + 1: bytes [k2t d2g, k2t d2g+1, k2t+1 d2g, k2t+1 d2g+1]. Regrouped by d they
// are B fragments of O += P V (k = keys 2t, 2t + 1) for two output columns: d 2g (`even`) and
// d 2g + 1 (`odd`). Even and odd columns of each 16-wide chunk thus land in separate n8 tiles;
// the epilogue puts them back in order (thread t then holds d 4t..4t+3 of the chunk).
__device__ __forceinline__ void fp8_v_frag(uint32_t x, uint32_t& even, uint32_t& odd) {
  even = fp8x2_to_f16x2(__byte_perm(x, 0u, 0x0020));
  odd = fp8x2_to_f16x2(__byte_perm(x, 0u, 0x0031));
}

// Q's A fragment (rows r, r + 8) for 16-wide head_dim step c in the permuted order above:
// thread t needs d 16c + 4t .. +3 of each row, 8 contiguous bytes of the swizzled Q tile.
template <int D>
__device__ __forceinline__ void fp8_q_frag(uint32_t (&a)[4], const unsigned char* q_tile, int r,
                                           int c, int t) {
  const int chunk = 2 * c + (t >> 1), within = (t & 1) * 8;
  const uint2 lo = *reinterpret_cast<const uint2*>(q_tile + swz<D>(r, chunk) + within);
  const uint2 hi = *reinterpret_cast<const uint2*>(q_tile + swz<D>(r + 8, chunk) + within);
  a[0] = lo.x;
  a[1] = hi.x;
  a[2] = lo.y;
  a[3] = hi.y;
}

// ---- the two MMA steps of a key tile, for one warp ----
// acc[mt][n], acc[mt][n + 1] += a[mt] x B for every row tile mt, where B is one k16 x n16
// operand given as two n8 fragments: (b[0], b[1]) for n8 tile n, (b[2], b[3]) for tile n + 1.
template <class Cfg, int N>
__device__ __forceinline__ void mma_n16(float (&acc)[Cfg::MT][N][4], int n,
                                        const uint32_t (&a)[Cfg::MT][4], const uint32_t (&b)[4]) {
#pragma unroll
  for (int mt = 0; mt < Cfg::MT; ++mt) {
    mma_16816<typename Cfg::CT>(acc[mt][n], a[mt], b[0], b[1]);
    mma_16816<typename Cfg::CT>(acc[mt][n + 1], a[mt], b[2], b[3]);
  }
}

// S[MT][KW/8] += Q rows [wrow0, wrow0 + 16 MT) x K^T of keys [key0, key0 + KW) of the tile.
// Q sits at the start of shared memory (16-bit, swizzled); k_base is the stage's K tile.
template <class Cfg>
__device__ __forceinline__ void qk_16bit(float (&s)[Cfg::MT][Cfg::KW / 8][4], uint32_t q_base,
                                         uint32_t k_base, int wrow0, int key0, int lane) {
  constexpr int D = Cfg::D, MT = Cfg::MT;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
      ldmatrix_x4(a[mt], q_base + swz<D>(wrow0 + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                         2 * kk + (lane >> 4)));
#pragma unroll
    for (int nt2 = 0; nt2 < Cfg::KW / 16; ++nt2) {
      uint32_t b[4];
      ldmatrix_x4(b, k_base + swz<D>(key0 + nt2 * 16 + (lane & 7) + ((lane >> 4) & 1) * 8,
                                     2 * kk + ((lane >> 3) & 1)));
      mma_n16<Cfg>(s, 2 * nt2, a, b);
    }
  }
}

template <class Cfg>
__device__ __forceinline__ void qk_fp8(float (&s)[Cfg::MT][Cfg::KW / 8][4],
                                       const unsigned char* q_tile, uint32_t k_base, int wrow0,
                                       int key0, int lane) {
  constexpr int D = Cfg::D, MT = Cfg::MT;
  const int g = lane >> 2, t = lane & 3;
  // One ldmatrix.x4: keys [0, 8) and [8, 16) of an n16 step at head_dim chunks c and c + 1.
#pragma unroll
  for (int c = 0; c < D / 16; c += 2) {
    uint32_t a[2][MT][4];
#pragma unroll
    for (int cc = 0; cc < 2; ++cc)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) fp8_q_frag<D>(a[cc][mt], q_tile, wrow0 + mt * 16 + g, c + cc, t);
#pragma unroll
    for (int nt2 = 0; nt2 < Cfg::KW / 16; ++nt2) {
      uint32_t r[4];
      ldmatrix_x4(r, k_base + swz_row<D>(key0 + nt2 * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                         c + (lane >> 4)));
#pragma unroll
      for (int cc = 0; cc < 2; ++cc) {
        uint32_t b[4];  // keys [0, 8) then [8, 16)
        fp8_k_frag(r[2 * cc], b[0], b[1]);
        fp8_k_frag(r[2 * cc + 1], b[2], b[3]);
        mma_n16<Cfg>(s, 2 * nt2, a[cc], b);
      }
    }
  }
}

// P (the probabilities in s, rounded to the compute dtype) as A fragments of k16 step kk.
template <class Cfg>
__device__ __forceinline__ void p_frags(uint32_t (&a)[Cfg::MT][4],
                                        const float (&s)[Cfg::MT][Cfg::KW / 8][4], int kk) {
  using TT = TypeTraits<typename Cfg::CT>;
#pragma unroll
  for (int mt = 0; mt < Cfg::MT; ++mt) {
    a[mt][0] = TT::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
    a[mt][1] = TT::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
    a[mt][2] = TT::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
    a[mt][3] = TT::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
  }
}

// O[MT][D/8] += P x V of keys [key0, key0 + KW) of the tile (v_base: the stage's V tile).
template <class Cfg>
__device__ __forceinline__ void pv_16bit(float (&o)[Cfg::MT][Cfg::D / 8][4],
                                         const float (&s)[Cfg::MT][Cfg::KW / 8][4],
                                         uint32_t v_base, int key0, int lane) {
  constexpr int D = Cfg::D, MT = Cfg::MT;
#pragma unroll
  for (int kk = 0; kk < Cfg::KW / 16; ++kk) {
    uint32_t a[MT][4];
    p_frags<Cfg>(a, s, kk);
#pragma unroll
    for (int dt2 = 0; dt2 < D / 16; ++dt2) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, v_base + swz<D>(key0 + kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                           2 * dt2 + (lane >> 4)));
      mma_n16<Cfg>(o, 2 * dt2, a, b);
    }
  }
}

// fp8 V: n8 tiles 2c and 2c + 1 of o receive the even and odd head_dim columns of chunk c.
template <class Cfg>
__device__ __forceinline__ void pv_fp8(float (&o)[Cfg::MT][Cfg::D / 8][4],
                                       const float (&s)[Cfg::MT][Cfg::KW / 8][4],
                                       uint32_t v_base, int key0, int lane) {
  constexpr int D = Cfg::D, MT = Cfg::MT;
#pragma unroll
  for (int kk = 0; kk < Cfg::KW / 16; ++kk) {
    uint32_t a[MT][4];
    p_frags<Cfg>(a, s, kk);
    // One ldmatrix.x4.trans: keys [0, 8) and [8, 16) at head_dim chunks c and c + 1.
#pragma unroll
    for (int c = 0; c < D / 16; c += 2) {
      uint32_t r[4];
      ldmatrix_x4_trans(r, v_base + swz_row<D>(key0 + kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                               c + (lane >> 4)));
#pragma unroll
      for (int cc = 0; cc < 2; ++cc) {
        uint32_t b[4];  // even d: keys [0, 8), [8, 16); then odd d
        fp8_v_frag(r[2 * cc], b[0], b[2]);
        fp8_v_frag(r[2 * cc + 1], b[1], b[3]);
        mma_n16<Cfg>(o, 2 * (c + cc), a, b);
      }
    }
  }
}

// The request whose seq_len has rank `rank` in decreasing order (ties in batch order, so equal
// lengths give rank -> rank). The block scheduler starts CTAs in blockIdx order; giving the
// y-th CTAs the y-th longest request starts the heavy work first and keeps the tail short
// when lengths differ (longest-processing-time-first). Costs each CTA one read of seq_lens
// and, unless all lengths are equal, batch^2 / threads comparisons, hence
// AttnLaunch::longest_first only for small batches. Uses the first 16 + 4 * batch bytes of
// shared memory as scratch; all threads must call it. The pick has a 16-byte slot of its
// own: racecheck (H200, CUDA 13) flagged its write against the reads of the lengths when
// it followed them directly, most likely because nvcc reads the lengths 16 bytes at a time.
template <int NT>
__device__ int request_of_length_rank(const AttnParams& p, int rank, unsigned char* smem) {
  const int B = int(p.batch);
  int* s_pick = reinterpret_cast<int*>(smem);
  int* s_len = reinterpret_cast<int*>(smem + 16);
  const int first = p.seq_lens[0];
  bool same = true;
  for (int i = threadIdx.x; i < B; i += NT) {
    s_len[i] = p.seq_lens[i];
    same &= s_len[i] == first;
  }
  if (__syncthreads_and(same)) return rank;  // uniform batch: batch order is already LPT
  for (int i = threadIdx.x; i < B; i += NT) {
    const int li = s_len[i];
    int r = 0;
    for (int j = 0; j < B; ++j) {
      const int lj = s_len[j];
      r += (lj > li) | ((lj == li) & (j < i));
    }
    if (r == rank) *s_pick = i;
  }
  __syncthreads();
  const int b = *s_pick;
  __syncthreads();  // the scratch is the K/V pipeline's memory
  return b;
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinCtasPerSm) attn_tile_kernel(const __grid_constant__ AttnLaunch L) {
  using CT = typename Cfg::CT;
  constexpr int D = Cfg::D, BM = Cfg::BM, BN = Cfg::BN, KW = Cfg::KW, WM = Cfg::WM;
  constexpr int MT = Cfg::MT;
  constexpr int NT = Cfg::kThreads;
  extern __shared__ __align__(128) unsigned char smem[];

  const AttnParams& p = L.p;
  const int S = L.num_splits;
  const int split = blockIdx.x % S;
  const int kvh = blockIdx.x / S;
  const int b = L.longest_first ? request_of_length_rank<Cfg::kThreads>(L.p, blockIdx.y, smem)
                                : int(blockIdx.y);
  const int rb = L.row_blocks - 1 - int(blockIdx.z);  // heaviest (latest) row blocks first

  const int G = L.group;
  const int tid = threadIdx.x;
  Timeline tl;  // phase stamps of a diagnostic build (timeline.cuh); nothing otherwise
  if (tid == 0) tl.mark(kTlStart);
  ReqMeta meta;
  if (L.fused_checks) {
    const RequestInfo ri = request_info_with_run_max(p, b, 0);
    meta.row_begin = int32_t(ri.row_begin);
    meta.q_len = int32_t(ri.q_len);
    meta.kv_len = ri.valid ? int32_t(ri.kv_len) : 0;
    meta.status = ri.valid ? kReqValid : kReqInvalid;
  } else {
    meta = L.meta[b];
    if (meta.status != kReqValid) return;  // the prepare kernel wrote its NaN rows
  }
  // (Never taken for a request this launch serves with splits merged in its tiles: every split
  // CTA of such a request must reach finish_split.)
  if (meta.q_len == 0 || rb * BM >= meta.q_len * G || !serves_rows(L, meta.q_len * G)) return;
  // The block's rows, positions and this split's keys (tile_work.cuh, shared with sm90).
  const TileWork w = tile_work<BM, BN>(p, meta, G, rb, split, S);
  const int rows_total = w.rows_total, r0 = w.r0, r_end = w.r_end;
  const int pos_first = w.pos_first, pos_last = w.pos_last;
  const int kb = w.kb, ke = w.ke, ntiles = w.ntiles;
  const int kv_len = meta.kv_len;
  const int q_len = meta.q_len;
  const int64_t window = p.window_left;
  const bool causal = p.causal;

  // Fused checks: NaN rows (one split) or NaN split lse (the merge then writes NaN rows) for
  // an invalid request or one with a page index out of range in [kb, ke).
  auto write_invalid = [&]() {
    const int64_t Hq = p.num_q_heads;
    for (int idx = tid; idx < (r_end - r0) * (D / 4); idx += NT) {
      const int R = r0 + idx / (D / 4), c4 = idx % (D / 4);
      const int64_t row_id = (meta.row_begin + R / G) * Hq + int64_t(kvh) * G + R % G;
      if (S == 1) {
        store4(p.out, row_id * D + c4 * 4, p.out_dtype, make_float4(NAN, NAN, NAN, NAN));
        if (c4 == 0) p.lse[row_id] = NAN;
      } else {  // zeros keep every partial output initialized for the merge's loads
        const int64_t prow = part_row(L, split, int(blockIdx.y), kvh, R, row_id);
        *reinterpret_cast<float4*>(L.part_out + prow * D + c4 * 4) = make_float4(0.f, 0.f, 0.f, 0.f);
        if (c4 == 0) L.part_lse[prow] = NAN;
      }
    }
  };
  // Fused merge (L.merge_count, 16-row shape only; experimental): after its partials are
  // written, a split CTA counts itself in for its (request, KV head); the one that completes
  // the count merges the group's rows (merge_row.cuh). The barrier makes every thread's
  // partial stores precede thread 0's acquire-release add; the add precedes the merging
  // CTA's loads (its other threads follow through the barrier of __syncthreads_or).
  auto finish_split = [&]() {
    if constexpr (WM == 1) {
      if (L.merge_count == nullptr) return;
      // The group's count by its CTAs' blockIdx.y (b itself may be a longest-first rank's
      // request; compact partials come from launches without that order, so there b is
      // blockIdx.y), re-read rather than kept live through the key loop.
      int* count = L.merge_count + int64_t(blockIdx.y) * p.kv.num_heads + blockIdx.x / S;
      __syncthreads();
      if (!__syncthreads_or(tid == 0 && atomic_add_acq_rel_gpu(count, 1) == S - 1)) return;
      constexpr int kMaxRegs = 65536 / (NT * Cfg::kMinCtasPerSm);  // __launch_bounds__' cap
      merge_group_rows<D, NT, kMaxRegs>(L, int(blockIdx.y), meta.row_begin, kvh, r0,
                                        r_end - r0);
    }
  };
  if (meta.status != kReqValid) {  // fused checks only (uniform over the CTA)
    write_invalid();
    if (S > 1) finish_split();
    return;
  }

  // ---- K/V tile loader ----
  const int32_t* bt_row = p.block_tables + int64_t(b) * p.max_pages_per_req;
  const int page_shift = L.page_shift;
  const char* k_src = static_cast<const char*>(p.kv.k);
  const char* v_src = static_cast<const char*>(p.kv.v);
  const uint32_t smem_base = smem_addr(smem);
  const uint32_t stage_base = smem_base + Cfg::kQBytes;

  // Thread tid copies 16-byte chunk (tid % C) of keys tid / C + it * KP, it < IT. The page
  // lookup of each key is done once per warp, by one lane, and handed out by shuffles.
  constexpr int C = Cfg::kRawChunks;
  constexpr int KP = NT / C;                // keys per pass of the CTA
  constexpr int IT = BN / KP;               // passes per tile
  constexpr int KPW = C >= 32 ? 1 : 32 / C;  // keys per pass of a warp
  static_assert(BN % KP == 0 && IT * KPW <= 32 && (C <= 32), "loader shape");
  const int lane_ = tid & 31, warp_ = tid >> 5;
  const int ch = tid % C;
  const int own_key = warp_ * KPW + (lane_ % KPW) + (lane_ / KPW) * KP;  // lanes < IT * KPW

  int bad_page = 0;  // this thread looked up a page index outside [0, num_pages)
  auto issue_tile = [&](int stage, int j0) {
    const uint32_t dst0 = stage_base + stage * Cfg::kStageBytes;
    long long own_off = -1;  // byte offset of the owned key's row, -1 outside [kb, ke)
    if (lane_ < IT * KPW) {
      const int j = j0 + own_key;
      if (j < ke) {
        // Every page of [kb, ke) is looked up here exactly when its keys are loaded. The
        // prepare kernel has checked them (non-fused), or this check keeps a bad index from
        // being dereferenced (zero-fill) and the epilogue turns the CTA's rows into NaN.
        // One 64-bit byte offset per key (a pool may pass 2^31 bytes and elements); the
        // 16-byte chunks of the row are then at own_off + 16 * ch, inside the key's row.
        const int64_t e = key_row_elem(p.kv, bt_row, j, page_shift, kvh);
        if (e >= 0)
          own_off = e * Cfg::kPageBytes;
        else
          bad_page = 1;
      }
    }
#pragma unroll
    for (int it = 0; it < IT; ++it) {
      const int key = tid / C + it * KP;
      const long long off = __shfl_sync(0xffffffffu, own_off, it * KPW + (C >= 32 ? 0 : lane_ / C));
      const char* ks = k_src;
      const char* vs = v_src;
      int bytes = 0;
      if (off >= 0) {
        ks += off + ch * 16;
        vs += off + ch * 16;
        bytes = 16;
      }
      const uint32_t d = dst0 + swz_row<Cfg::kRawRow>(key, ch);
      cp_async_16(d, ks, bytes);
      cp_async_16(d + Cfg::kRawTile, vs, bytes);
    }
  };

  // ---- per-thread state ----
  const int warp = tid >> 5, lane = tid & 31;
  const int wm = warp % WM, wn = warp / WM;
  const int g = lane >> 2, tig = lane & 3;
  const int wrow0 = wm * 16 * MT;  // first block row of this warp
  int pos_r[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int R = min(r0 + wrow0 + mt * 16 + g + 8 * h, rows_total - 1);
      pos_r[mt][h] = kv_len - q_len + R / G;
    }
  const float qk_scale = p.sm_scale * p.scales[0];
  const float v_scale = p.scales[1];
  const bool use_cap = p.softcap > 0.0f;
  const float scale_log2 = qk_scale * kLog2e;
  const float cap_in = use_cap ? qk_scale / p.softcap : 0.0f;
  const float cap_out = p.softcap * kLog2e;

  float o_acc[MT][D / 8][4];
  float m_run[MT][2], l_run[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
      o_acc[mt][i][0] = o_acc[mt][i][1] = o_acc[mt][i][2] = o_acc[mt][i][3] = 0.0f;
    m_run[mt][0] = m_run[mt][1] = -INFINITY;
    l_run[mt][0] = l_run[mt][1] = 0.0f;
  }

  // The first kStages - 1 K/V tiles in flight before Q is staged (Q's loads overlap them).
#pragma unroll
  for (int s = 0; s < Cfg::kStages - 1; ++s) {
    if (s < ntiles) issue_tile(s, kb + s * BN);
    cp_async_commit();
  }

  // ---- stage Q: BM packed rows x D, compute dtype, swizzled (visible to every warp after
  // the first __syncthreads of the loop) ----
  stage_q<CT, D, BM, NT>(L, meta, kvh, w, tid, smem,
                         [](int r, int c) { return swz<D>(r, c); });
  if (tid == 0) tl.mark(kTlQ);


  int stage = 0;  // t % kStages
  for (int t = 0; t < ntiles; ++t) {
    const int j0 = kb + t * BN;
    // Refill the stage used by tile t - 1 (released by the barrier ending that iteration).
    constexpr int kAhead = Cfg::kStages - 1;
    if (t + kAhead < ntiles)
      issue_tile(stage == 0 ? kAhead : stage - 1, j0 + kAhead * BN);
    cp_async_commit();
    cp_async_wait<Cfg::kStages - 1>();
    __syncthreads();
    if (t == 0 && tid == 0) tl.mark(kTlTile0);

    const uint32_t k_base = stage_base + stage * Cfg::kStageBytes;
    const uint32_t v_base = k_base + Cfg::kRawTile;

    // ---- S = Q K^T for this warp's 16*MT rows x KW keys ----
    float s_acc[MT][KW / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < KW / 8; ++i)
        s_acc[mt][i][0] = s_acc[mt][i][1] = s_acc[mt][i][2] = s_acc[mt][i][3] = 0.0f;
    if constexpr (Cfg::kFp8)
      qk_fp8<Cfg>(s_acc, smem, k_base, wrow0, wn * KW, lane);
    else
      qk_16bit<Cfg>(s_acc, smem_base, k_base, wrow0, wn * KW, lane);
    // ---- logits (log2 domain), mask, online softmax ----
    const bool full = tile_all_visible(j0, j0 + BN, ke, pos_first, pos_last, causal, window);
    const int jw = j0 + wn * KW;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int nt = 0; nt < KW / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x = s_acc[mt][nt][e];
          x = use_cap ? cap_out * tanhf(x * cap_in) : x * scale_log2;
          if (!full) {
            const int j = jw + nt * 8 + tig * 2 + (e & 1);
            if (!(j < ke && key_visible(pos_r[mt][e >> 1], j, causal, window))) x = -INFINITY;
          }
          s_acc[mt][nt][e] = x;
          mx[e >> 1] = fmaxf(mx[e >> 1], x);
        }
      }
      float m_use[2], alpha[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
        const float m_new = fmaxf(m_run[mt][h], mx[h]);
        m_use[h] = m_new == -INFINITY ? 0.0f : m_new;
        alpha[h] = fast_exp2(m_run[mt][h] - m_use[h]);
        m_run[mt][h] = m_new;
        l_run[mt][h] *= alpha[h];
      }
      // Once the running maxima settle (most tiles of a long row) no row of the warp moves:
      // skip the D / 2 multiplies of the accumulator rescale.
      if (__any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f)) {
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          o_acc[mt][dt][0] *= alpha[0];
          o_acc[mt][dt][1] *= alpha[0];
          o_acc[mt][dt][2] *= alpha[1];
          o_acc[mt][dt][3] *= alpha[1];
        }
      }
#pragma unroll
      for (int nt = 0; nt < KW / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float pr = fast_exp2(s_acc[mt][nt][e] - m_use[e >> 1]);
          l_run[mt][e >> 1] += pr;
          s_acc[mt][nt][e] = pr;
        }
      }
    }

    // ---- O += P V ----
    if constexpr (Cfg::kFp8)
      pv_fp8<Cfg>(o_acc, s_acc, v_base, wn * KW, lane);
    else
      pv_16bit<Cfg>(o_acc, s_acc, v_base, wn * KW, lane);
    __syncthreads();  // this stage may be overwritten next
    stage = stage + 1 == Cfg::kStages ? 0 : stage + 1;
  }
  if (tid == 0) tl.mark(kTlLoop);

  // ---- epilogue: combine the WN key-slices of each row, normalize, write ----
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      l_run[mt][h] += __shfl_xor_sync(0xffffffffu, l_run[mt][h], 1);
      l_run[mt][h] += __shfl_xor_sync(0xffffffffu, l_run[mt][h], 2);
    }
  cp_async_wait<0>();
  if (__syncthreads_or(bad_page)) {  // only possible with fused checks
    write_invalid();
    if (S > 1) finish_split();
    return;
  }
  float* red_o = reinterpret_cast<float*>(smem + Cfg::kQBytes);
  float* red_m = red_o + Cfg::WN * BM * Cfg::kRedStride;
  float* red_l = red_m + Cfg::WN * BM;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = wrow0 + mt * 16 + g + 8 * h;
      float* dst = red_o + (wn * BM + row) * Cfg::kRedStride;
      if constexpr (Cfg::kFp8) {  // n8 tiles 2c / 2c + 1 hold the even / odd d of chunk c
#pragma unroll
        for (int c = 0; c < D / 16; ++c)
          *reinterpret_cast<float4*>(dst + c * 16 + tig * 4) =
              make_float4(o_acc[mt][2 * c][2 * h], o_acc[mt][2 * c + 1][2 * h],
                          o_acc[mt][2 * c][2 * h + 1], o_acc[mt][2 * c + 1][2 * h + 1]);
      } else {
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt)
          *reinterpret_cast<float2*>(dst + tig * 2 + dt * 8) =
              make_float2(o_acc[mt][dt][2 * h], o_acc[mt][dt][2 * h + 1]);
      }
      if (tig == 0) {
        red_m[wn * BM + row] = m_run[mt][h];
        red_l[wn * BM + row] = l_run[mt][h];
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
        fma4(o, sc, v);
      }
    }
    const int64_t tok = meta.row_begin + R / G;
    const int64_t head = int64_t(kvh) * G + R % G;
    const int64_t row_id = tok * Hq + head;
    if (S == 1) {
      const RowScale rs = final_row(M, lsum, p.sinks, head, v_scale);
      store4(p.out, row_id * D + c4 * 4, p.out_dtype,
             make_float4(o.x * rs.scale, o.y * rs.scale, o.z * rs.scale, o.w * rs.scale));
      if (c4 == 0) p.lse[row_id] = rs.lse;
    } else {
      // Empty split (lse -inf): weight 0 in the merge, which reads its (zeroed) output
      // unconditionally. blockIdx.y, not b, as in finish_split.
      const int64_t prow = part_row(L, split, int(blockIdx.y), kvh, R, row_id);
      const RowScale rs = split_row(M, lsum, v_scale);
      *reinterpret_cast<float4*>(L.part_out + prow * D + c4 * 4) =
          lsum > 0.0f ? make_float4(o.x * rs.scale, o.y * rs.scale, o.z * rs.scale, o.w * rs.scale)
                      : make_float4(0.f, 0.f, 0.f, 0.f);
      if (c4 == 0) L.part_lse[prow] = rs.lse;
    }
  }
  if (S > 1) finish_split();
  if (tid == 0) {
    tl.mark(kTlEnd);
    tl.print(ntiles);
  }
}

// Launch helpers for one configuration (kernel_runner.cuh); info() is cached per device by
// the caller.
template <class Cfg>
using TileRunner = KernelRunner<Cfg, attn_tile_kernel<Cfg>>;

// K/V pipeline depth of the decode shape: 16-bit pages 3 stages (two tiles in flight while one
// is used; measured better than 2 stages with more CTAs per SM). fp8 pages 3 as well: their
// 16 KB tiles then fit 4 CTAs per SM (H100, 128 x 2048: 4 stages measured 6% slower).
constexpr int kDecodeStages16 = 3;
constexpr int kDecodeStages8 = 3;

// BN8 / WN8: key tile and key-splitting warps of fp8 pages (their rows are half as long, so a
// tile may hold more keys).
template <int D, int WM, int WN, int BN, int MT, int S16 = 2, int S8 = 2, int BN8 = BN,
          int WN8 = WN>
struct ShapeCfgs {
  using BF16 = TileRunner<TileCfg<D, WM, WN, BN, __nv_bfloat16, false, MT, S16>>;
  using F16 = TileRunner<TileCfg<D, WM, WN, BN, __half, false, MT, S16>>;
  using F8 = TileRunner<TileCfg<D, WM, WN8, BN8, __half, true, MT, S8>>;
};

template <class Cfgs>
cudaError_t run_for_dtype(const AttnLaunch* L, DType page_dtype, TileInfo* info, dim3 grid,
                          cudaStream_t stream) {
  switch (page_dtype) {
    case DType::kBF16: return info_or_launch<typename Cfgs::BF16>(L, info, grid, stream);
    case DType::kF16: return info_or_launch<typename Cfgs::F16>(L, info, grid, stream);
    case DType::kF8E4M3: return info_or_launch<typename Cfgs::F8>(L, info, grid, stream);
    default: return cudaErrorInvalidValue;
  }
}

// Dispatch over (shape, page dtype) for one head_dim; used by the attn_d*.cu files.
// Big128BN: key tile of the 128-row shape, 0 when that shape does not exist for this head_dim
// (it then maps to the 64-row shape). DecBN8 / DecWN8: decode key tile / warps of fp8 pages.
template <int D, int DecWN, int DecBN, int PreBN, int Big128BN, int DecBN8 = DecBN,
          int DecWN8 = DecWN>
cudaError_t attn_tiles_dispatch(const AttnLaunch* L, int shape, DType page_dtype,
                                TileInfo* info, dim3 grid, cudaStream_t stream) {
  if (shape == kShapeDecode)
    return run_for_dtype<
        ShapeCfgs<D, 1, DecWN, DecBN, 1, kDecodeStages16, kDecodeStages8, DecBN8, DecWN8>>(
        L, page_dtype, info, grid, stream);
  if constexpr (Big128BN > 0) {
    if (shape == kShapePrefill128)
      return run_for_dtype<ShapeCfgs<D, 4, 1, Big128BN, 2>>(L, page_dtype, info, grid, stream);
  }
  return run_for_dtype<ShapeCfgs<D, 4, 1, PreBN, 1>>(L, page_dtype, info, grid, stream);
}

}  // namespace cuda
}  // namespace jpa
