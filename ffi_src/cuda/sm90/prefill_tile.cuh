// The sm90 family's prefill kernel: warpgroup MMAs (wgmma, sm_90a) for S = Q K^T and
// O += P V, fp32 accumulators in registers, in a warp-specialized CTA.
//
// One CTA = (KV split, KV head, request, block of 128 packed query rows), the same work
// split, row packing (r = token * G + group head, so each K/V tile serves the whole GQA
// group), key range and split policy as the sm80 tiles, so the launcher, the prepare kernel
// and the split merge are shared.
//
// Three warpgroups of 128 threads:
//   * warpgroups 0 and 1 compute: warpgroup w owns block rows [64 w, 64 w + 64) and every
//     key of each tile. Per key tile of BN keys it issues D / 16 MMAs m64 n{BN} k16 for S
//     (A = Q, B = K, both K-major from shared memory), masks (mask.h), runs the online
//     softmax in fp32 registers (log2 domain), rounds P to the compute dtype in registers
//     and issues BN / 16 MMAs m64 n{D} k16 for O (A = P from registers, B = V read
//     MN-major: rows are keys, head_dim contiguous, as stored).
//   * warpgroup 2 loads: it gathers each tile's K and V rows from their pages with 16-byte
//     cp.async (any page size: keys are looked up one by one through key_row_elem) into a
//     kStages-deep ring, gives most of its registers to the MMA warpgroups, and never joins
//     their math. fp8 pages: the rows are gathered as they are into a 2-stage staging ring
//     (one tile ahead), and each load thread widens the chunks it copied to f16 into the
//     ring (exact for every e4m3 value), so the MMA warpgroups run the f16 kernel unchanged;
//     the scales stay out of the loop (k_scale in the logit scale, v_scale on the output).
// The ring runs on mbarriers: full[s] completes when the loads of stage s have landed (and
// are fenced for the MMA unit), empty[s] when both MMA warpgroups are done reading it. The
// two MMA warpgroups take turns issuing their MMAs (named barriers), so one's softmax runs
// while the other's MMAs keep the tensor cores busy. Where the ring has three stages
// (PrefillCfg::kOverlap: head_dim 64, and 128 with 16-bit pages), a turn issues the next
// tile's S and this tile's P V, and the warpgroup's softmax of the next tile also overlaps its
// own P V.
//
// Q, K and V tiles are stored in 128-byte-swizzle atoms (hopper.cuh), the layout the MMA
// reads through descriptors.
//
// Scope: prefill (the launcher keeps decode on sm80), bf16 / f16 pages at head_dim 64 / 128 /
// 256, fp8 e4m3 pages at head_dim 64 / 128 (at 256 the staging ring does not fit beside two
// stages; those stay on sm80). The prepare kernel has checked every request and
// its pages (rule 1-3 of docs/semantics.md) and written the NaN rows of invalid ones and the
// padding rows. Not yet here: TMA loads, and the softmax overlap in the two-stage
// configurations (head_dim 256, and fp8 pages at 128, whose staging ring takes the third
// stage's room).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../../common/index.h"
#include "../../common/mask.h"
#include "../attn_common.cuh"
#include "../cuda_utils.cuh"
#include "../tile_families.h"
#include "../kernel_runner.cuh"
#include "../tile_work.cuh"
#include "../timeline.cuh"
#include "hopper.cuh"
#include "wgmma_ops.cuh"

namespace jpa {
namespace cuda {
namespace sm90 {

template <int D_, int BN_, typename CT_, int Stages_, bool Fp8_ = false>
struct PrefillCfg {
  static constexpr int D = D_;
  static constexpr int BN = BN_;
  using CT = CT_;
  static constexpr int kStages = Stages_;
  // One stage for the tile the MMA warpgroups read and one for the loader to fill.
  static_assert(kStages >= 2, "the ring needs two stages");
  // With a third stage each MMA warpgroup overlaps its softmax with its own P V MMAs (it
  // then holds two tiles of the ring at a time, leaving the loader one: it pays only with
  // load_kv_tiles' lag and lookup ahead, docs/cuda_kernels.md); with two (head_dim 256, fp8
  // pages at 128) tiles run one after the other.
  static constexpr bool kOverlap = kStages >= 3;
  static constexpr bool kFp8 = Fp8_;  // fp8 e4m3 pages, widened to CT (f16) by the loader
  static constexpr int kMmaWarpgroups = 2;
  static constexpr int kMmaThreads = 128 * kMmaWarpgroups;
  static constexpr int kThreads = kMmaThreads + 128;  // + the load warpgroup
  static constexpr int BM = 64 * kMmaWarpgroups;
  // Registers per thread after the hand-over (setmaxnreg; multiples of 8). The MMA
  // warpgroups' increase must fit in what the load warpgroup gives back from the launch's
  // share (65536 / kThreads, rounded down to 8): setmaxnreg.inc waits until it does. The
  // loader spills below 56 since it looks up the next tile's pages a tile ahead (run 10).
  static constexpr int kLaunchRegs = (65536 / kThreads) / 8 * 8;
  static constexpr int kLoadRegs = 56;
  static constexpr int kMmaRegs = 224;
  static_assert(kLoadRegs + kMmaWarpgroups * kMmaRegs <= (1 + kMmaWarpgroups) * kLaunchRegs,
                "the MMA warpgroups' registers must come from the load warpgroup's");
  static_assert(D % 64 == 0 && BN % 64 == 0, "whole 128-byte swizzle column blocks / atoms");
  static constexpr int kChunks = D / 8;            // 16-byte chunks of one row
  static constexpr int kQBytes = BM * D * 2;
  static constexpr int kTileBytes = BN * D * 2;    // K (or V) of one stage
  static constexpr int kStageBytes = 2 * kTileBytes;
  static constexpr int kBarBytes = 2 * 8 * kStages;  // full[], empty[]
  // fp8 pages: the staging ring of raw rows, K then V of a tile, [key][D bytes] each.
  static constexpr int kRawStages = kFp8 ? 2 : 0;
  static constexpr int kRawTileBytes = BN * D;
  static constexpr int kRawStageBytes = 2 * kRawTileBytes;
  // + 1024: the dynamic shared memory base is rounded up to a 1024-byte boundary.
  static constexpr int kSmemBytes =
      1024 + kQBytes + kStages * kStageBytes + kRawStages * kRawStageBytes + kBarBytes;
  static_assert(!kFp8 || std::is_same<CT, __half>::value, "fp8 pages compute in f16");
};

// Named barriers (0 is __syncthreads): Q staged (the MMA warpgroups), each MMA warpgroup's
// turn to issue its S MMAs, and each one's output rows written to shared memory.
constexpr int kBarQReady = 1;
constexpr int kBarTurn0 = 2;
constexpr int kBarOut0 = 4;  // each MMA warpgroup's output rows staged (4, 5)

// The load warpgroup's gather shape for rows of C 16-byte chunks: warp wp takes keys
// [wp * KW, wp * KW + KW) of a tile; lane l < KW looks up key l's row once (the block-table
// load, then page_row_elem: the page bounds, 64-bit address math), then the warp copies KPP
// keys per pass, LPK lanes per key, each lane taking its key's row offset from the looking-up
// lane by a shuffle (a lookup per copying lane would repeat it C times).
template <int BN, int C>
struct KeyGather {
  static constexpr int KW = BN / 4;                  // keys per warp and tile
  static constexpr int KPP = C >= 32 ? 1 : 32 / C;   // keys per pass
  static constexpr int LPK = C >= 32 ? 32 : C;       // lanes per key in a pass
  static constexpr int CPL = C / LPK;                // chunks per lane and key
  static_assert(KW <= 32 && KW % KPP == 0 && C % LPK == 0, "loader shape");

  // This lane's key of a tile: its page as read from the block table (-1 for a lane without
  // a key, or a key past w.ke: the last tile's tail) and its slot in the page.
  struct Lookup {
    int32_t page;  // as the block table holds it
    int slot;
  };
  // The first step, a global load: the loaders issue it a tile ahead, so its latency runs
  // under the copies of the tile before instead of in front of this tile's.
  __device__ __forceinline__ static Lookup lookup(const AttnLaunch& L, const int32_t* bt_row,
                                                  const TileWork& w, int tile, int ltid) {
    const int lane = ltid % 32;
    const int jl = w.kb + tile * BN + (ltid / 32) * KW + lane;
    if (lane >= KW || jl >= w.ke) return {-1, 0};
    const KeySlot<int> ks = key_slot(L.p.kv, jl, L.page_shift);
    return {bt_row[ks.pi], ks.slot};
  }

  // f(key in the tile, chunk, element offset of the key's row or -1) for each chunk this
  // load thread copies of the tile `mine` was looked up for. A key without a row gets -1,
  // and so does a page index out of range (the prepare kernel checked every page of
  // [kb, ke)): callers zero-fill those chunks and never dereference them.
  template <class F>
  __device__ __forceinline__ static void rows(const AttnLaunch& L, const Lookup& mine, int kvh,
                                              int ltid, F f) {
    const int lane = ltid % 32, key0 = (ltid / 32) * KW;
    const int64_t e_mine = page_row_elem(L.p.kv, mine.page, mine.slot, kvh);
#pragma unroll
    for (int pass = 0; pass < KW / KPP; ++pass) {
      const int kl = pass * KPP + lane / LPK;  // key of this warp's share
      const int64_t e = __shfl_sync(0xffffffffu, e_mine, kl);
#pragma unroll
      for (int cc = 0; cc < CPL; ++cc) f(key0 + kl, lane % LPK + cc * LPK, e);
    }
  }

  // f(key in the tile, chunk) for the same chunks, with no lookup.
  template <class F>
  __device__ __forceinline__ static void chunks(int ltid, F f) {
    const int lane = ltid % 32, key0 = (ltid / 32) * KW;
#pragma unroll
    for (int pass = 0; pass < KW / KPP; ++pass)
#pragma unroll
      for (int cc = 0; cc < CPL; ++cc) f(key0 + pass * KPP + lane / LPK, lane % LPK + cc * LPK);
  }
};

// The load warpgroup: tiles [0, ntiles) of [kb, ke) into the ring, 16-byte cp.async per
// chunk (KeyGather), zero-filled where a key has no row (its P is then 0, and 0 * 0 stays 0).
// A stage is announced kLag tiles late: after the copies of the next kLag tiles are issued,
// this thread waits for its copies of the stage, fences them for the MMA unit (async proxy)
// and arrives on full[stage]. kLag is the number of free slots beyond the one being filled:
// the stages less the tiles the MMA warpgroups hold (one; two with the softmax overlap), less
// one. A later announcement makes the MMA warpgroups wait, at each tile, for the copies of
// the tile after it to be issued into the slot they have just freed (run 10: +25-29% at
// head_dim 256, two stages, with a lag of 0 instead of 1).
template <class Cfg>
__device__ __forceinline__ void load_kv_tiles(const AttnLaunch& L, int b, int kvh,
                                              const TileWork& w, int ltid, uint32_t stage_base,
                                              uint32_t full_bar, uint32_t empty_bar) {
  constexpr int BN = Cfg::BN;
  using Gather = KeyGather<BN, Cfg::kChunks>;
  const AttnParams& p = L.p;
  const int32_t* bt_row = p.block_tables + int64_t(b) * p.max_pages_per_req;
  const char* k_src = static_cast<const char*>(p.kv.k);
  const char* v_src = static_cast<const char*>(p.kv.v);
  constexpr int kLag = Cfg::kStages - (Cfg::kOverlap ? 2 : 1) - 1;
  static_assert(kLag >= 0, "the MMA warpgroups hold more tiles than the ring has");
  typename Gather::Lookup next = Gather::lookup(L, bt_row, w, 0, ltid);
  for (int tile = 0; tile < w.ntiles; ++tile) {
    const int stage = tile % Cfg::kStages;
    const typename Gather::Lookup mine = next;
    if (tile >= Cfg::kStages) mbar_wait(empty_bar + 8 * stage, ((tile / Cfg::kStages) & 1) ^ 1);
    const uint32_t k_dst = stage_base + stage * Cfg::kStageBytes;
    Gather::rows(L, mine, kvh, ltid, [&](int key, int ch, int64_t e) {
      const int64_t byte_off = e >= 0 ? e * 2 + ch * 16 : 0;
      const uint32_t off = sw128_offset(BN, key, ch);
      cp_async_16(k_dst + off, k_src + byte_off, e >= 0 ? 16 : 0);
      cp_async_16(k_dst + Cfg::kTileBytes + off, v_src + byte_off, e >= 0 ? 16 : 0);
    });
    cp_async_commit();
    if (tile + 1 < w.ntiles) next = Gather::lookup(L, bt_row, w, tile + 1, ltid);
    if (tile >= kLag) {
      cp_async_wait<kLag>();
      fence_proxy_async_shared();
      mbar_arrive(full_bar + 8 * ((tile - kLag) % Cfg::kStages));
    }
  }
  if (kLag > 0 && w.ntiles > 0) {  // the last kLag tiles
    cp_async_wait<0>();
    fence_proxy_async_shared();
    for (int tile = max(w.ntiles - kLag, 0); tile < w.ntiles; ++tile)
      mbar_arrive(full_bar + 8 * (tile % Cfg::kStages));
  }
}

// The load warpgroup for fp8 pages: the same gather over 16-byte chunks of fp8 rows (16
// elements), into the staging ring at raw_base: tile t + 1 is copied while tile t is
// widened. Each thread widens exactly the chunks it copied itself, so its own
// cp.async.wait_group orders them (no barrier among the load threads): 16 fp8 -> two 16-byte
// f16 chunks at the tile's swizzled positions 2c, 2c + 1, then the fence for the MMA unit and
// the arrival on full[stage]. A stage is announced as soon as it is written.
template <class Cfg>
__device__ __forceinline__ void load_kv_tiles_fp8(const AttnLaunch& L, int b, int kvh,
                                                  const TileWork& w, int ltid,
                                                  uint32_t stage_base, uint32_t raw_base,
                                                  uint32_t full_bar, uint32_t empty_bar) {
  constexpr int BN = Cfg::BN, D = Cfg::D;
  using Gather = KeyGather<BN, D / 16>;  // fp8 chunks of one row
  const AttnParams& p = L.p;
  const int32_t* bt_row = p.block_tables + int64_t(b) * p.max_pages_per_req;
  const char* k_src = static_cast<const char*>(p.kv.k);
  const char* v_src = static_cast<const char*>(p.kv.v);

  // One commit group per call; then the lookup of the tile after it (KeyGather::lookup).
  typename Gather::Lookup next = Gather::lookup(L, bt_row, w, 0, ltid);
  auto copy_raw = [&](int tile) {
    const uint32_t k_raw = raw_base + (tile % 2) * Cfg::kRawStageBytes;
    Gather::rows(L, next, kvh, ltid, [&](int key, int ch, int64_t e) {
      const int64_t byte_off = e >= 0 ? e + ch * 16 : 0;  // one byte per element
      const uint32_t off = key * D + ch * 16;
      cp_async_16(k_raw + off, k_src + byte_off, e >= 0 ? 16 : 0);
      cp_async_16(k_raw + Cfg::kRawTileBytes + off, v_src + byte_off, e >= 0 ? 16 : 0);
    });
    cp_async_commit();
    if (tile + 1 < w.ntiles) next = Gather::lookup(L, bt_row, w, tile + 1, ltid);
  };

  if (w.ntiles > 0) copy_raw(0);
  for (int tile = 0; tile < w.ntiles; ++tile) {
    const int stage = tile % Cfg::kStages;
    // Tile + 1 goes into the staging slot this thread widened last iteration (its loads
    // of that slot have returned: their values were stored before this point).
    if (tile + 1 < w.ntiles) {
      copy_raw(tile + 1);
    } else {
      cp_async_commit();  // an empty group keeps wait_group<1> meaning "tile has landed"
    }
    if (tile >= Cfg::kStages) mbar_wait(empty_bar + 8 * stage, ((tile / Cfg::kStages) & 1) ^ 1);
    cp_async_wait<1>();
    const uint32_t k_raw = raw_base + (tile % 2) * Cfg::kRawStageBytes;
    const uint32_t k_dst = stage_base + stage * Cfg::kStageBytes;
    Gather::chunks(ltid, [&](int key, int ch) {
#pragma unroll
      for (int kv = 0; kv < 2; ++kv) {
        uint4 lo, hi;
        fp8x16_to_f16x16(ld_shared_16(k_raw + kv * Cfg::kRawTileBytes + key * D + ch * 16), lo,
                         hi);
        const uint32_t dst = k_dst + kv * Cfg::kTileBytes;
        st_shared_16(dst + sw128_offset(BN, key, 2 * ch), lo);
        st_shared_16(dst + sw128_offset(BN, key, 2 * ch + 1), hi);
      }
    });
    fence_proxy_async_shared();  // this thread's stores -> visible to the MMA unit
    mbar_arrive(full_bar + 8 * stage);
  }
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    prefill_wgmma_kernel(const __grid_constant__ AttnLaunch L) {
  using CT = typename Cfg::CT;
  constexpr int D = Cfg::D, BN = Cfg::BN, BM = Cfg::BM, NT = Cfg::kMmaThreads;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw_addr = smem_addr(smem_raw);
  const uint32_t q_base = (raw_addr + 1023u) & ~1023u;
  unsigned char* q_tile = smem_raw + (q_base - raw_addr);
  const uint32_t stage_base = q_base + Cfg::kQBytes;
  const uint32_t raw_base = stage_base + Cfg::kStages * Cfg::kStageBytes;  // fp8 staging
  const uint32_t full_bar = raw_base + Cfg::kRawStages * Cfg::kRawStageBytes;
  const uint32_t empty_bar = full_bar + 8 * Cfg::kStages;

  const AttnParams& p = L.p;
  const int S = L.num_splits;
  const int split = blockIdx.x % S;
  const int kvh = blockIdx.x / S;
  const int b = blockIdx.y;
  const int rb = L.row_blocks - 1 - int(blockIdx.z);  // heaviest (latest) row blocks first
  const int G = L.group;
  const int tid = threadIdx.x;
  Timeline tl;  // phase stamps of a diagnostic build (timeline.cuh); nothing otherwise
  if (tid == 0) tl.mark(kTlStart);

  // Exits before any barrier: the conditions are the same for every thread of the CTA.
  const ReqMeta meta = L.meta[b];
  if (meta.status != kReqValid || meta.q_len == 0) return;  // prepare wrote those rows
  if (rb * BM >= meta.q_len * G || !serves_rows(L, meta.q_len * G)) return;
  // Rows, positions and this split's keys exactly as the sm80 tiles (tile_work.cuh).
  const TileWork w = tile_work<BM, BN>(p, meta, G, rb, split, S);

  if (tid == 0) {
    for (int s = 0; s < Cfg::kStages; ++s) {
      mbar_init(full_bar + 8 * s, 128);    // every load thread arrives
      mbar_init(empty_bar + 8 * s, NT);    // every MMA thread arrives
    }
  }
  __syncthreads();  // the barriers are initialized; the last CTA-wide barrier

  if (tid >= NT) {  // ---- the load warpgroup ----
    regs_dealloc<Cfg::kLoadRegs>();
    if constexpr (Cfg::kFp8) {
      load_kv_tiles_fp8<Cfg>(L, b, kvh, w, tid - NT, stage_base, raw_base, full_bar,
                             empty_bar);
    } else {
      load_kv_tiles<Cfg>(L, b, kvh, w, tid - NT, stage_base, full_bar, empty_bar);
    }
    return;
  }
  regs_alloc<Cfg::kMmaRegs>();

  const int rows_total = w.rows_total, r0 = w.r0;
  const int kb = w.kb, ke = w.ke, ntiles = w.ntiles;
  const int kv_len = meta.kv_len;
  const int q_len = meta.q_len;
  const int64_t window = p.window_left;
  const bool causal = p.causal;

  // ---- stage Q: BM packed rows x D in the compute dtype, 128-byte-swizzle atoms ----
  stage_q<CT, D, BM, NT, true>(L, meta, kvh, w, tid, q_tile,
                               [](int r, int c) { return sw128_offset(BM, r, c); });
  fence_proxy_async_shared();  // this thread's Q stores -> visible to the MMA unit
  bar_sync(kBarQReady, NT);
  if (tid == 0) tl.mark(kTlQ);

  // ---- per-thread state: warpgroup wg, warp wi of it, lane (g = lane / 4, t = lane % 4).
  // Accumulator value v of an n8 column chunk i sits at row g + 8 * (v / 2), column
  // 8 i + 2 t + v % 2 of the warp's 16 rows (wgmma_ops.cuh).
  // wg is read from lane 0 so the compiler knows it is warp-uniform: the Q descriptors of every
  // S MMA derive from it and then live in uniform registers (otherwise 16 vector registers
  // and an R2UR pair in front of each S MMA).
  const int wg = __shfl_sync(0xffffffffu, tid / 128, 0), wi = (tid / 32) % 4, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int wrow0 = 64 * wg + 16 * wi;  // first block row of this warp
  int pos_r[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int R = min(r0 + wrow0 + g + 8 * h, rows_total - 1);
    pos_r[h] = kv_len - q_len + R / G;
  }
  // Each row's visible keys [vis_lo, vis_hi) (the mask policy's range, cut at this split's
  // end): a logit outside is masked, two compares per element.
  int vis_lo[2], vis_hi[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    int64_t lo, hi;
    visible_range(pos_r[h], kv_len, causal, window, &lo, &hi);
    vis_lo[h] = int(lo);
    vis_hi[h] = int(min(hi, int64_t(ke)));
  }
  // Positions of this warpgroup's rows, for the full-tile test.
  const int wg_first = kv_len - q_len + min(r0 + 64 * wg, rows_total - 1) / G;
  const int wg_last = kv_len - q_len + min(r0 + 64 * wg + 63, rows_total - 1) / G;
  const float qk_scale = p.sm_scale * p.scales[0];
  const float v_scale = p.scales[1];
  const bool use_cap = p.softcap > 0.0f;
  const float scale_log2 = qk_scale * kLog2e;
  const float cap_in = use_cap ? qk_scale / p.softcap : 0.0f;
  // Without a soft cap and with a positive scale, the scale moves into the exponent: the max
  // of raw logits times the scale is the max of scaled ones, and exp2(s * scale - m) is one
  // FFMA per logit instead of an FMUL pass and an FADD (the mask's -inf stays -inf).
  const bool fold_scale = !use_cap && scale_log2 > 0.0f;
  const float exp_mul = fold_scale ? scale_log2 : 1.0f;
  const float cap_out = p.softcap * kLog2e;

  float o_acc[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o_acc[i] = 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};
  // S of the tile in flight (fp32), then its probabilities; pa: P in the compute dtype, the
  // A fragments of the P V MMAs (the n8 chunks 2 kk and 2 kk + 1 of S are k-step kk's).
  float s_acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) s_acc[i] = 0.0f;  // overwritten (accumulate 0), but defined
  uint32_t pa[BN / 16][4] = {};
  float alpha[2];

  const uint32_t q_wg = q_base + 64 * wg * 128;  // this warpgroup's 64 rows of each block
  auto stage_addr = [&](int tile) {
    return stage_base + (tile % Cfg::kStages) * Cfg::kStageBytes;
  };
  auto wait_full = [&](int tile) {
    mbar_wait(full_bar + 8 * (tile % Cfg::kStages), (tile / Cfg::kStages) & 1);
  };
  // Releases the tile's stage to the load warpgroup: this thread's MMAs no longer read it.
  auto release = [&](int tile) { mbar_arrive(empty_bar + 8 * (tile % Cfg::kStages)); };
  // S = Q K^T of `tile` into s_acc: D / 16 k-steps, a step is 32 bytes inside a 64-wide
  // column block; one commit group. The caller has fenced (wgmma_fence).
  // Each k-step's descriptors are the tile's first ones advanced by a constant (desc_advance).
  const uint64_t dq0 = sw128_desc(q_wg, 16, 1024);
  auto issue_s = [&](int tile) {
    const uint64_t dk0 = sw128_desc(stage_addr(tile), 16, 1024);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t col = (kk / 4), within = (kk % 4) * 32;
      const uint64_t da = desc_advance(dq0, col * BM * 128 + within);
      const uint64_t db = desc_advance(dk0, col * BN * 128 + within);
      Wgmma<BN, CT>::ss(s_acc, da, db, kk > 0 ? 1 : 0);
    }
    wgmma_commit();
  };
  // O += P V of `tile` from pa: BN / 16 k-steps of 16 keys (2048 bytes of V rows each); one
  // commit group.
  auto issue_pv = [&](int tile) {
    const uint64_t dv0 = sw128_desc(stage_addr(tile) + Cfg::kTileBytes, BN * 128, 1024);
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint64_t dv = desc_advance(dv0, kk * 16 * 128);
      Wgmma<D, CT>::rs(o_acc, pa[kk], dv, 1);
    }
    wgmma_commit();
  };
  // The landed S of `tile` -> logits (log2 domain), mask, online softmax: the running max and
  // sum move on, s_acc becomes P and alpha the factor O must be rescaled by before P V. Each
  // step is one branch-free pass over the tile's logits (a branch per element would cost
  // more than the MMAs).
  auto softmax = [&](int tile) {
    const int j0 = kb + tile * BN;
    if (use_cap) {
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) s_acc[i] = cap_out * tanhf(s_acc[i] * cap_in);
    } else if (!fold_scale) {
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) s_acc[i] *= scale_log2;
    }
    if (!tile_all_visible(j0, j0 + BN, ke, wg_first, wg_last, causal, window)) {
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) {
        const int h = (i >> 1) & 1;
        const int j = j0 + 8 * (i >> 2) + 2 * t + (i & 1);  // n8 chunk i / 4, value i % 4
        if (j < vis_lo[h] || j >= vis_hi[h]) s_acc[i] = -INFINITY;
      }
    }
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) mx[(i >> 1) & 1] = fmaxf(mx[(i >> 1) & 1], s_acc[i]);
    float m_use[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
      mx[h] *= exp_mul;  // raw logits: their max in the log2 domain (-inf stays -inf)
      const float m_new = fmaxf(m_run[h], mx[h]);
      m_use[h] = m_new == -INFINITY ? 0.0f : m_new;
      alpha[h] = fast_exp2(m_run[h] - m_use[h]);
      m_run[h] = m_new;
      l_run[h] *= alpha[h];
    }
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) {
      const float pr = fast_exp2(fmaf(s_acc[i], exp_mul, -m_use[(i >> 1) & 1]));
      l_run[(i >> 1) & 1] += pr;
      s_acc[i] = pr;
    }
  };
  // O *= alpha, only when a row max of the warp moved (alpha is exactly 1 otherwise, which
  // long rows see in most tiles); the test is warp-uniform, so no lane diverges.
  auto rescale_o = [&]() {
    if (__any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f)) {
#pragma unroll
      for (int i = 0; i < D / 8; ++i) {
        o_acc[4 * i + 0] *= alpha[0];
        o_acc[4 * i + 1] *= alpha[0];
        o_acc[4 * i + 2] *= alpha[1];
        o_acc[4 * i + 3] *= alpha[1];
      }
    }
  };
  auto pack_p = [&]() {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
      for (int q = 0; q < 4; ++q)
        pa[kk][q] = TypeTraits<CT>::pack(s_acc[8 * kk + 2 * q], s_acc[8 * kk + 2 * q + 1]);
  };
  // Before wgmma_fence: no ordinary write of the MMAs' registers may move past it (and
  // registers written between two MMAs would make ptxas insert a fence before each).
  auto fence_operands = [&]() {
    fence_registers(s_acc);
    fence_registers(pa);
    fence_registers(o_acc);
    wgmma_fence();
  };

  // Turns: warpgroup w issues its MMAs after bar_sync(kBarTurn0 + w) and then hands the turn
  // to the other one, so one's softmax runs while the other's MMAs keep the tensor cores
  // busy. Warpgroup 0 starts; its extra wait after the loop takes the other's last
  // hand-over, so every arrival is matched (both warpgroups take the same number of turns).
  if (wg == 1) bar_arrive(kBarTurn0, NT);
  auto take_turn = [&]() { bar_sync(kBarTurn0 + wg, NT); };
  auto pass_turn = [&]() { bar_arrive(kBarTurn0 + (wg ^ 1), NT); };
  if constexpr (Cfg::kOverlap) {
    // Each turn issues the next tile's S and this tile's P V; the softmax of the next tile
    // then runs while this warpgroup's own P V is still on the tensor cores. The ring holds
    // two tiles per warpgroup at a time (this one's V, the next one's K), so the load
    // warpgroup needs a third stage to stay ahead.
    if (ntiles > 0) {
      wait_full(0);
      if (tid == 0) tl.mark(kTlTile0);
      fence_operands();
      take_turn();
      issue_s(0);
      pass_turn();
      wgmma_wait<0>();
      fence_registers(s_acc);
      softmax(0);  // alpha is 0 or 1 here and O is still 0: no rescale
      pack_p();
    }
    // Every tile but the last: its P V and the next tile's S (no MMA issue under a
    // condition, which would make ptxas serialize the MMAs).
    for (int tile = 0; tile + 1 < ntiles; ++tile) {
      wait_full(tile + 1);
      fence_operands();
      take_turn();
      issue_s(tile + 1);
      issue_pv(tile);
      pass_turn();
      wgmma_wait<1>();  // groups complete in order: S of tile + 1 has landed
      fence_registers(s_acc);
      softmax(tile + 1);
      wgmma_wait<0>();
      // P V of `tile` is done with pa and o_acc: keep pa live until here (nothing may reuse
      // its registers while the MMA reads them), and no access of O above the wait.
      fence_registers(pa);
      fence_registers(o_acc);
      release(tile);
      rescale_o();
      pack_p();
    }
    if (ntiles > 0) {  // the last tile's P V
      fence_operands();
      take_turn();
      issue_pv(ntiles - 1);
      pass_turn();
      wgmma_wait<0>();
      fence_registers(o_acc);
      release(ntiles - 1);
    }
  } else {
    // One tile per warpgroup at a time: S, its softmax, then P V, waited for before the next
    // tile's S.
    for (int tile = 0; tile < ntiles; ++tile) {
      wait_full(tile);
      if (tile == 0 && tid == 0) tl.mark(kTlTile0);
      fence_operands();
      take_turn();
      issue_s(tile);
      pass_turn();
      wgmma_wait<0>();
      fence_registers(s_acc);
      softmax(tile);
      rescale_o();
      pack_p();
      fence_operands();  // the rescale and P stay before the MMAs
      issue_pv(tile);
      wgmma_wait<0>();
      fence_registers(o_acc);
      release(tile);
    }
  }
  if (tid == 0) tl.mark(kTlLoop);
  if (wg == 0) bar_sync(kBarTurn0, NT);

  // ---- epilogue: each thread's two rows, all keys of this split ----
  const int64_t Hq = p.num_q_heads;
  auto row_id_of = [&](int R) {  // the output row of packed row R: [token, head]
    return (meta.row_begin + R / G) * Hq + int64_t(kvh) * G + R % G;
  };
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 1);
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 2);
  }
  if (S == 1) {
    with_out_type(p.out_dtype, [&](auto zero) {
      using T = decltype(zero);
      // 16-bit outputs go out through shared memory: each thread's accumulator pairs are
      // 4-byte pieces of 8 rows (32-byte sectors half written by a warp's store), while a
      // row read back from shared memory leaves in whole 16-byte chunks, 4x fewer stores.
      // The warpgroup's own 64 rows of the Q tile hold them: its S MMAs, the only readers of
      // those rows, have completed (wgmma_wait above), and the 128-byte swizzle makes both
      // the 4-byte writes of a warp (8 rows, one chunk) and the 16-byte reads conflict-free.
      constexpr bool kViaSmem = sizeof(T) == 2;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int R = r0 + wrow0 + g + 8 * h;
        const int64_t head = int64_t(kvh) * G + R % G;
        // No visible key: zeros (written as such, never 0 * whatever V held), lse -inf.
        const bool any = l_run[h] > 0.0f;
        const RowScale rs = final_row(m_run[h], l_run[h], p.sinks, head, v_scale);
        if (R < rows_total && t == 0) p.lse[row_id_of(R)] = rs.lse;
        auto o_val = [&](int v) { return any ? o_acc[v] * rs.scale : 0.0f; };
        if constexpr (kViaSmem) {
#pragma unroll
          for (int i = 0; i < D / 8; ++i)
            *reinterpret_cast<uint32_t*>(q_tile + sw128_offset(BM, wrow0 + g + 8 * h, i) +
                                         4 * t) =
                TypeTraits<T>::pack(o_val(4 * i + 2 * h), o_val(4 * i + 2 * h + 1));
        } else if (R < rows_total) {
          T* dst = static_cast<T*>(p.out) + row_id_of(R) * D + 2 * t;
#pragma unroll
          for (int i = 0; i < D / 8; ++i)
            store2_as(dst + 8 * i, o_val(4 * i + 2 * h), o_val(4 * i + 2 * h + 1));
        }
      }
      if constexpr (kViaSmem) {
        bar_sync(kBarOut0 + wg, 128);  // the warpgroup's 64 rows are in shared memory
        constexpr int kRowChunks = D / 8;
#pragma unroll
        for (int it = 0; it < 64 * kRowChunks / 128; ++it) {
          const int q = it * 128 + tid % 128;
          const int row = 64 * wg + q / kRowChunks, ch = q % kRowChunks;
          const int R = r0 + row;
          if (R < rows_total)
            *reinterpret_cast<uint4*>(static_cast<T*>(p.out) + row_id_of(R) * D + 8 * ch) =
                *reinterpret_cast<const uint4*>(q_tile + sw128_offset(BM, row, ch));
        }
      }
    });
  } else {  // a split partial; an empty split gets weight 0 (lse -inf) and zeros
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int R = r0 + wrow0 + g + 8 * h;
      if (R >= rows_total) continue;
      const int64_t prow = part_row(L, split, b, kvh, R, row_id_of(R));
      const RowScale rs = split_row(m_run[h], l_run[h], v_scale);
      const bool any = l_run[h] > 0.0f;
#pragma unroll
      for (int i = 0; i < D / 8; ++i)
        *reinterpret_cast<float2*>(L.part_out + prow * D + 8 * i + 2 * t) =
            any ? make_float2(o_acc[4 * i + 2 * h] * rs.scale, o_acc[4 * i + 2 * h + 1] * rs.scale)
                : make_float2(0.0f, 0.0f);
      if (t == 0) L.part_lse[prow] = rs.lse;
    }
  }
  if (tid == 0) {
    tl.mark(kTlEnd);
    tl.print(ntiles);
  }
}

template <class Cfg>
using PrefillRunner = KernelRunner<Cfg, prefill_wgmma_kernel<Cfg>>;

// One head_dim's entry: bf16 or f16 pages (compute dtype = page dtype), and fp8 pages
// (compute dtype f16) with Fp8Stages stages when that is > 0 (sm90_takes_fp8 in
// tile_families.h must say the same).
template <int D, int BN, int Stages, int Fp8Stages>
cudaError_t prefill_dispatch(const AttnLaunch* L, DType page_dtype, TileInfo* info, dim3 grid,
                             cudaStream_t stream) {
  using BF16 = PrefillRunner<PrefillCfg<D, BN, __nv_bfloat16, Stages>>;
  using F16 = PrefillRunner<PrefillCfg<D, BN, __half, Stages>>;
  switch (page_dtype) {
    case DType::kBF16: return info_or_launch<BF16>(L, info, grid, stream);
    case DType::kF16: return info_or_launch<F16>(L, info, grid, stream);
    case DType::kF8E4M3:
      if constexpr (Fp8Stages > 0) {
        using F8 = PrefillRunner<PrefillCfg<D, BN, __half, Fp8Stages, true>>;
        return info_or_launch<F8>(L, info, grid, stream);
      }
      return cudaErrorInvalidValue;
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace sm90
}  // namespace cuda
}  // namespace jpa
