// Host side of decode and prefill: checks what the kernels support, picks the tile shape and
// the number of KV splits (from the SM count, the occupancy of the chosen kernel, the grid the
// batch gives and the workspace it was handed; nothing read from device memory), lays out the
// workspace and launches prepare -> tiles -> (merge); decode with the 16-row tile shape skips
// prepare (the tiles check their own request and pages). Graph-capture safe: only launches, plus
// cached host-side queries of device attributes.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

#include "../common/gpu_limits.h"
#include "attn_launch.h"
#include "cuda_utils.cuh"
#include "launchers.h"
#include "tile_families.h"

#ifndef JPA_WITH_SM90
#define JPA_WITH_SM90 0
#endif

namespace jpa {
namespace {

using cuda::AttnLaunch;
using cuda::DeviceInfo;
using cuda::TileInfo;

cudaError_t tiles_for(cuda::Family family, int64_t d, const AttnLaunch* L, int shape,
                      DType page_dtype, TileInfo* info, dim3 grid, cudaStream_t stream) {
#if JPA_WITH_SM90
  if (family == cuda::Family::kSm90) {
    switch (d) {
      case 64: return cuda::sm90_prefill_d64(L, page_dtype, info, grid, stream);
      case 128: return cuda::sm90_prefill_d128(L, page_dtype, info, grid, stream);
      case 256: return cuda::sm90_prefill_d256(L, page_dtype, info, grid, stream);
      default: return cudaErrorInvalidValue;
    }
  }
#else
  if (family == cuda::Family::kSm90) return cudaErrorNotSupported;
#endif
  switch (d) {
    case 64: return cuda::attn_tiles_d64(L, shape, page_dtype, info, grid, stream);
    case 128: return cuda::attn_tiles_d128(L, shape, page_dtype, info, grid, stream);
    case 256: return cuda::attn_tiles_d256(L, shape, page_dtype, info, grid, stream);
    default: return cudaErrorInvalidValue;
  }
}

// Occupancy facts per (device, family, head_dim, shape, page dtype), queried once.
cudaError_t cached_tile_info(int dev, cuda::Family family, int64_t d, int shape,
                             DType page_dtype, TileInfo* out) {
  using Key = std::tuple<int, int, int64_t, int, int>;
  static std::mutex mu;
  static std::map<Key, TileInfo> cache;
  const Key key{dev, int(family), d, shape, int(page_dtype)};
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it == cache.end()) {
    TileInfo ti;
    JPA_CUDA_TRY(tiles_for(family, d, nullptr, shape, page_dtype, &ti, dim3(), nullptr));
    it = cache.emplace(key, ti).first;
  }
  *out = it->second;
  return cudaSuccess;
}

// Kernel family of one call. The sm90 family (built with JPA_SM90) serves prefill with bf16
// or f16 pages (and fp8 pages at head_dim 64 / 128) on compute capability 9.0, and is the
// default there; sm80 serves everything else. The launch switch force_sm80
// (JPA_CUDA_FAMILY=sm80 when the call was lowered) forces sm80 everywhere, so one Hopper card
// checks and measures both families (docs/cuda_kernels.md).
cuda::Family choose_family(const AttnParams& p, const DeviceInfo& di, int shape) {
  const bool pages_ok = p.kv.dtype == DType::kBF16 || p.kv.dtype == DType::kF16 ||
                        (p.kv.dtype == DType::kF8E4M3 && cuda::sm90_takes_fp8(p.head_dim));
  const bool fits = di.cc_major == 9 && di.cc_minor == 0 && !p.is_decode() &&
                    shape != cuda::kShapeDecode && pages_ok;
  return JPA_WITH_SM90 && !p.launch.force_sm80 && fits ? cuda::Family::kSm90
                                                       : cuda::Family::kSm80;
}

DType compute_dtype(DType page_dtype) {
  return page_dtype == DType::kBF16 ? DType::kBF16 : DType::kF16;
}

int page_shift_of(int64_t page_size) {
  if (page_size <= 0 || (page_size & (page_size - 1)) != 0) return -1;
  int s = 0;
  while ((int64_t(1) << s) < page_size) ++s;
  return s;
}

// The most KV splits worth considering for `base` CTAs (one per split): about 4 waves of
// `slots` CTAs (at most kMaxTargetCtas), at least kMinKeysPerSplit keys of the block table's
// `capacity` per split, at most kMaxSplits.
int64_t split_limit(int64_t base, int64_t slots, int64_t capacity) {
  int64_t want = 4 * slots;
  if (want > cuda::kMaxTargetCtas) want = cuda::kMaxTargetCtas;
  int64_t s_hi = (want + base - 1) / base;
  int64_t cap_splits = capacity / cuda::kMinKeysPerSplit;
  if (cap_splits < 1) cap_splits = 1;
  if (s_hi > cap_splits) s_hi = cap_splits;
  if (s_hi > cuda::kMaxSplits) s_hi = cuda::kMaxSplits;
  return s_hi < 1 ? 1 : s_hi;
}

// Among 1..s_hi splits, the count whose last wave of base * s CTAs over `slots` is fullest
// (uniform lengths make the wave model exact), preferring fewer splits unless more fill the
// waves 1% better.
int64_t pick_splits(int64_t base, int64_t slots, int64_t s_hi) {
  auto wave_fill = [&](int64_t s) {
    const double w = double(base * s) / double(slots);
    const double full = w < 1.0 ? 1.0 : std::ceil(w);
    return w / full;
  };
  int64_t splits = 1;
  double best = wave_fill(1);
  for (int64_t s = 2; s <= s_hi; ++s) {
    const double f = wave_fill(s);
    if (f > best + 0.01) {
      best = f;
      splits = s;
    }
  }
  return splits;
}

// What the launcher decided for one call, before anything runs: the kernels' arguments
// (AttnLaunch, with the workspace carved up), the tile shape, the grid, and the kernel
// family. Planning reads device attributes (cached) and never device memory.
struct AttnPlan {
  AttnLaunch L;
  int shape = 0;
  dim3 grid;
  bool prepare_only = false;  // no requests: prepare writes the padding rows, nothing else
  cuda::Family family = cuda::Family::kSm80;
  // Mixed batches (JPA_CUDA_MIXED=1): a second tile launch, the 16-row shape of the sm80
  // family, for the requests of at most cuda::kSmallRows rows (L then serves the others),
  // with its own KV splits.
  bool small_launch = false;
  AttnLaunch L_small;
  dim3 grid_small;
};

cudaError_t PlanAttention(const AttnParams& p, AttnPlan* plan) {
  AttnLaunch& L = plan->L;
  const int64_t D = p.head_dim;
  if (D != 64 && D != 128 && D != 256) return cudaErrorInvalidValue;
  if (p.q.dtype != DType::kBF16 && p.q.dtype != DType::kF16) return cudaErrorInvalidValue;
  const DType pd = p.kv.dtype;
  if (pd != DType::kBF16 && pd != DType::kF16 && pd != DType::kF8E4M3)
    return cudaErrorInvalidValue;
  if (p.out_dtype != DType::kBF16 && p.out_dtype != DType::kF16 && p.out_dtype != DType::kF32)
    return cudaErrorInvalidValue;
  if (p.kv.num_heads <= 0 || p.num_q_heads % p.kv.num_heads != 0 || p.kv.page_size <= 0)
    return cudaErrorInvalidValue;
  if (p.num_tokens == 0 || p.num_q_heads == 0) {  // nothing to write
    plan->grid = dim3(0, 0, 0);
    return cudaSuccess;
  }
  // The kernels index rows, keys and grid dimensions with 32-bit integers; every address
  // (token * stride, page * page_stride, row * head_dim, workspace offsets) is formed in
  // int64 (docs/int64_audit.md). The shape limits that keeps safe (common/gpu_limits.h) are
  // raised at trace time by the CUDA lowering; checked again here.
  if (gpu_shape_limit(p.num_tokens, p.num_q_heads, p.num_q_heads / p.kv.num_heads,
                      p.head_dim, p.batch, p.max_pages_per_req, p.kv.page_size,
                      p.max_q_len) != nullptr)
    return cudaErrorInvalidValue;

  const int64_t B = p.batch;
  const int64_t Hkv = p.kv.num_heads;
  const int64_t G = p.num_q_heads / Hkv;

  L.p = p;
  L.group = int32_t(G);
  L.page_shift = page_shift_of(p.kv.page_size);

  const int64_t meta_bytes = ws::meta_bytes(B);
  if (p.workspace == nullptr || p.workspace_bytes < meta_bytes) return cudaErrorInvalidValue;
  L.meta = static_cast<cuda::ReqMeta*>(p.workspace);

  if (B == 0) {  // prefill with no requests: every row is padding
    plan->prepare_only = true;
    return cudaSuccess;
  }

  DeviceInfo di;
  int dev = 0;
  JPA_CUDA_TRY(cuda::current_device_info(&di, &dev));
  // Tile shape (of the sm80 family) from the rows (token, group head) a request can have per
  // KV head; it also tells decode-like calls (few rows) from prefill.
  const int64_t max_rows = p.max_q_len * G;
  int shape = max_rows <= 16   ? cuda::kShapeDecode
              : max_rows <= 64 ? cuda::kShapePrefill64
                               : cuda::kShapePrefill128;
  // Benchmarking knob (JPA_CUDA_TILE_ROWS=64 or 128 at lowering): a forced prefill shape.
  if (shape != cuda::kShapeDecode) {
    if (p.launch.tile_rows == 64) shape = cuda::kShapePrefill64;
    if (p.launch.tile_rows == 128) shape = cuda::kShapePrefill128;
  }
  // Decode with the 16-row shape needs no prepare kernel: the tiles check their request and
  // pages themselves (AttnLaunch::fused_checks). Prefill keeps it (padding rows, run max).
  L.fused_checks = p.is_decode() && shape == cuda::kShapeDecode;
  // The longest_first switch off (JPA_CUDA_LONGEST_FIRST=0 at lowering, a benchmarking
  // knob) keeps batch order.
  L.longest_first = p.launch.longest_first && L.fused_checks && B > 1 &&
                    B <= cuda::kMaxLongestFirstBatch;
  plan->family = choose_family(p, di, shape);
  TileInfo ti;
  JPA_CUDA_TRY(cached_tile_info(dev, plan->family, D, shape, pd, &ti));
  if (ti.smem_bytes > di.max_smem_optin || ti.ctas_per_sm < 1) return cudaErrorInvalidConfiguration;

  const int64_t row_blocks = (p.max_q_len * G + ti.block_rows - 1) / ti.block_rows;
  if (row_blocks > 65535) return cudaErrorInvalidValue;
  L.row_blocks = int32_t(row_blocks);

  // KV splits (split_limit, pick_splits), within what the workspace holds.
  const int64_t slots = int64_t(di.num_sms) * ti.ctas_per_sm;
  const int64_t capacity = p.max_pages_per_req * p.kv.page_size;
  const int64_t base = B * Hkv * row_blocks;
  int64_t s_hi = split_limit(base, slots, capacity);
  const int64_t rows = p.num_tokens * p.num_q_heads;
  const int64_t count_bytes = ws::count_bytes(B, Hkv);
  while (s_hi > 1 &&
         meta_bytes + count_bytes + ws::split_bytes(s_hi, rows, D) > p.workspace_bytes)
    --s_hi;
  // Benchmarking knob (JPA_CUDA_SPLITS=n at lowering): n splits, within the same cap (the
  // mixed launch's 16-row part below keeps its own count).
  const int64_t splits = p.launch.splits > 0 ? std::min<int64_t>(p.launch.splits, s_hi)
                                             : pick_splits(base, slots, s_hi);
  if (splits > 1) {
    char* ws = static_cast<char*>(p.workspace) + meta_bytes;
    // With the fused_merge switch (experimental, off by default: slower on the H200, run 8),
    // decode with the 16-row shape merges its splits in its tiles (one row block per request
    // and KV head, so one count each).
    if (L.fused_checks && p.launch.fused_merge) L.merge_count = reinterpret_cast<int*>(ws);
    ws += count_bytes;
    L.part_lse = reinterpret_cast<float*>(ws);
    L.part_out = reinterpret_cast<float*>(ws + cuda::align_up(splits * rows * 4, cuda::kWsAlign));
  }
  L.num_splits = int32_t(splits);

  const uintptr_t qaddr = reinterpret_cast<uintptr_t>(p.q.ptr);
  L.q_vec = p.q.dtype == compute_dtype(pd) && qaddr % 16 == 0 && p.q.stride_tok % 8 == 0 &&
            p.q.stride_head % 8 == 0;

  if (splits * Hkv >= (int64_t(1) << 31)) return cudaErrorInvalidValue;  // grid.x, blockIdx.x / S
  plan->shape = shape;
  plan->grid = dim3(unsigned(splits * Hkv), unsigned(B), unsigned(row_blocks));

  // Mixed batches: requests of at most kSmallRows rows (decode tokens, short chunks) get the
  // 16-row shape in a launch of their own instead of a prefill tile each. The launcher cannot
  // see q lengths (device memory), so each CTA checks its request's class and returns at once
  // when it is the other launch's. The short launch splits its requests' keys with a count
  // of its own, for B x Hkv CTAs of its shape (runs 6 and 8: sharing the prefill launch's
  // count, 1 at the mixed point, was the cause of the mixed call's loss), writes compact
  // partials into the workspace's small region (workspace.h) and merges
  // them in its tiles (the fused merge); the merge launch serves only the other requests.
  // Off unless the mixed_split switch is on (JPA_CUDA_MIXED=1 at lowering).
  if (p.launch.mixed_split && !p.is_decode() && shape != cuda::kShapeDecode && B > 1 &&
      G <= cuda::kSmallRows) {
    TileInfo small;
    JPA_CUDA_TRY(cached_tile_info(dev, cuda::Family::kSm80, D, cuda::kShapeDecode, pd, &small));
    if (small.smem_bytes > di.max_smem_optin || small.ctas_per_sm < 1)
      return cudaErrorInvalidConfiguration;
    AttnLaunch& Ls = plan->L_small;
    Ls = L;
    Ls.rows_class = cuda::kRowsSmall;
    Ls.row_blocks = 1;
    Ls.num_splits = 1;
    Ls.part_lse = Ls.part_out = nullptr;
    Ls.merge_count = nullptr;
    const int64_t slots_s = int64_t(di.num_sms) * small.ctas_per_sm;
    const int64_t used =
        meta_bytes + (splits > 1 ? count_bytes + ws::split_bytes(splits, rows, D) : 0);
    // The most splits (about 4 waves), not pick_splits: its wave model assumes CTAs of equal
    // work, but here the other class's CTAs exit at once and the short requests' contexts
    // differ (at the mixed point 512 CTAs fill 1, 2 or 3 splits' waves equally, so it would
    // keep 1 split, the measured loss).
    int64_t s_small = split_limit(B * Hkv, slots_s, capacity);
    while (s_small > 1 && used + ws::small_region_bytes(s_small, B, Hkv, D) > p.workspace_bytes)
      --s_small;
    if (s_small * Hkv >= (int64_t(1) << 31)) return cudaErrorInvalidValue;
    if (s_small > 1) {
      char* ws = static_cast<char*>(p.workspace) + used;
      Ls.merge_count = reinterpret_cast<int*>(ws);
      ws += ws::count_bytes(B, Hkv);
      const int64_t srows = ws::small_rows(B, Hkv);
      Ls.part_lse = reinterpret_cast<float*>(ws);
      Ls.part_out = reinterpret_cast<float*>(ws + cuda::align_up(s_small * srows * 4, cuda::kWsAlign));
      Ls.num_splits = int32_t(s_small);
      Ls.compact_parts = true;
    }
    plan->small_launch = true;
    plan->grid_small = dim3(unsigned(s_small * Hkv), unsigned(B), 1);
    L.rows_class = cuda::kRowsLarge;
  }
  return cudaSuccess;
}

// Runs a plan: prepare (unless the tiles check their own requests) -> tiles -> merge (split
// mode, unless the tiles merge). Only launches and a memset of the arrival counts (a memset
// node under capture): graph-capture safe.
cudaError_t LaunchPlanned(const AttnPlan& plan, cudaStream_t stream) {
  const AttnLaunch& L = plan.L;
  if (plan.prepare_only) return cuda::launch_attn_prepare(L, stream);
  if (plan.grid.x == 0) return cudaSuccess;
  if (!L.fused_checks) JPA_CUDA_TRY(cuda::launch_attn_prepare(L, stream));
  for (const AttnLaunch* l : {&L, &plan.L_small})
    if (l->merge_count != nullptr)
      JPA_CUDA_TRY(cudaMemsetAsync(l->merge_count, 0,
                                   size_t(l->p.batch * l->p.kv.num_heads) * sizeof(int), stream));
  JPA_CUDA_TRY(tiles_for(plan.family, L.p.head_dim, &L, plan.shape, L.p.kv.dtype, nullptr,
                         plan.grid, stream));
  if (plan.small_launch)
    JPA_CUDA_TRY(tiles_for(cuda::Family::kSm80, L.p.head_dim, &plan.L_small,
                           cuda::kShapeDecode, L.p.kv.dtype, nullptr, plan.grid_small, stream));
  if (L.num_splits > 1 && L.merge_count == nullptr)
    JPA_CUDA_TRY(cuda::launch_attn_merge(L, stream));
  return cudaSuccess;
}

cudaError_t LaunchAttention(const AttnParams& p, cudaStream_t stream) {
  AttnPlan plan;
  JPA_CUDA_TRY(PlanAttention(p, &plan));
  return LaunchPlanned(plan, stream);
}

}  // namespace

cudaError_t LaunchPagedDecode(const AttnParams& p, cudaStream_t stream) {
  if (!p.is_decode()) return cudaErrorInvalidValue;
  return LaunchAttention(p, stream);
}

cudaError_t LaunchPagedPrefill(const AttnParams& p, cudaStream_t stream) {
  if (p.is_decode()) return cudaErrorInvalidValue;
  return LaunchAttention(p, stream);
}

}  // namespace jpa
