// What the three attention kernels (prepare, tile, merge) share: the launch description, the
// per-request metadata the prepare kernel computes on the device, and the workspace layout.
//
// Flow of one decode/prefill call (all on one stream, no host reads of device memory):
//   1. attn_prepare: per request, row range + validity (rules 1-3 of docs/semantics.md,
//      pages checked once per request); writes NaN rows of invalid requests and the padding
//      rows (0 / -inf) of prefill; stores ReqMeta[b] in the workspace.
//   2. attn tile kernel: one CTA per (KV split, KV head, request, block of packed query rows);
//      the rows of a block are (token, query head of the group) pairs, so every K/V tile read
//      serves the whole GQA group. Writes final rows, or per-split partial states.
//   3. attn_merge (only with more than one split): combines the partial states (split decode
//      with fused checks can merge in its tiles instead: AttnLaunch::merge_count).
// Decode with the 16-row tile shape skips step 1 (AttnLaunch::fused_checks): the tiles derive
// their request's rows and validity, check page indices as they gather keys, and write NaN
// rows (or NaN split lse, which the merge turns into NaN rows) for an invalid request.
#pragma once

#include <cstdint>

#include "../common/params.h"
#include "../common/workspace.h"

namespace jpa {
namespace cuda {

// Request status codes in ReqMeta::status.
constexpr int32_t kReqValid = 1;
constexpr int32_t kReqInvalid = 0;

// Split-KV and workspace policy: ../common/workspace.h (shared with the extension module,
// which tells the Python lowering the workspace size).
using ws::kMaxSplits;
using ws::kMinKeysPerSplit;
using ws::kMaxTargetCtas;
using ws::kWsAlign;
using ws::align_up;
using jpa::ReqMeta;
// Largest batch for AttnLaunch::longest_first (its per-CTA cost grows as batch^2).
constexpr int64_t kMaxLongestFirstBatch = 128;

// Everything a tile / merge kernel needs: the params plus what the launcher derived.
struct AttnLaunch {
  AttnParams p;
  ReqMeta* meta = nullptr;      // [batch]
  float* part_lse = nullptr;    // [splits, T, Hq] log2-domain lse of each split (split mode)
  float* part_out = nullptr;    // [splits, T, Hq, D] normalized partial outputs (split mode)
  // The mixed split launch's short requests (rows_class kRowsSmall): partials indexed
  // [splits, B, Hkv, kSmallRows] by packed row instead of [splits, T, Hq] (workspace.h).
  bool compact_parts = false;
  // Fused merge (split decode with fused checks, experimental: JPA_CUDA_FUSED_MERGE=1; and
  // the mixed split launch): [batch, Hkv] arrival counts, zero before the tiles. Each split
  // CTA adds 1 to its (request, KV head) count after writing its partials; the one that
  // makes it S merges that group's rows (merge_row.cuh), so there is no merge launch for
  // them. Null: the merge kernel runs.
  int* merge_count = nullptr;
  int32_t group = 1;            // query heads per KV head
  int32_t num_splits = 1;
  int32_t row_blocks = 1;       // blocks of packed rows per (request, KV head)
  int32_t page_shift = -1;      // log2(page_size) when a power of two, else -1
  bool q_vec = false;           // q can be read with 16-byte loads in the compute dtype
  // Decode with the 16-row shape (one row block per request and KV head): no prepare kernel.
  // Each tile CTA derives its request's row range and validity itself and checks the pages
  // of its own key range (the splits' ranges cover [first_needed_key, kv_len)); an invalid
  // request gets NaN rows from the tiles (one split) or NaN split lse that the merge turns
  // into NaN rows. ReqMeta in the workspace is then neither written nor read.
  bool fused_checks = false;
  // Fused-checks decode of a small batch: CTA row y serves the y-th longest request
  // (request_of_length_rank in attn_tile.cuh), so mixed lengths leave a short tail.
  bool longest_first = false;
  // Mixed batches (prefill calls mixing decode tokens and chunks): the call's tiles run as
  // two launches, each serving only the requests of its class, so q_len-1 requests do not
  // pay for a prefill-shaped tile: kRowsSmall launches (the 16-row shape) serve requests of
  // at most kSmallRows packed rows, kRowsLarge launches the others, kRowsAll every request.
  int32_t rows_class = 0;
};

constexpr int32_t kRowsAll = 0, kRowsSmall = 1, kRowsLarge = 2;
constexpr int32_t kSmallRows = 16;

static_assert(kSmallRows == ws::kSmallBlockRows, "the workspace's small region rows");

// Does this launch serve a request of `rows_total` packed rows (AttnLaunch::rows_class)?
__device__ __forceinline__ bool serves_rows(const AttnLaunch& L, int rows_total) {
  return L.rows_class == kRowsAll || ((rows_total <= kSmallRows) == (L.rows_class == kRowsSmall));
}

// Index of split `split`'s partial state of packed row R of (request b, KV head kvh), whose
// output row is row_id; consecutive splits of a row are part_split_stride(L) apart.
__device__ __forceinline__ int64_t part_row(const AttnLaunch& L, int split, int b, int kvh,
                                            int R, int64_t row_id) {
  if (L.compact_parts)
    return ((int64_t(split) * L.p.batch + b) * L.p.kv.num_heads + kvh) * kSmallRows + R;
  return int64_t(split) * L.p.num_tokens * L.p.num_q_heads + row_id;
}

__device__ __forceinline__ int64_t part_split_stride(const AttnLaunch& L) {
  return L.compact_parts ? L.p.batch * L.p.kv.num_heads * kSmallRows
                         : L.p.num_tokens * L.p.num_q_heads;
}

}  // namespace cuda
}  // namespace jpa
