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
//   3. attn_merge (only with more than one split): combines the partial states.
// Decode with the 16-row tile shape skips step 1 (AttnLaunch::fused_checks): the tiles derive
// their request's rows and validity, check page indices as they gather keys, and write NaN
// rows (or NaN split lse, which the merge turns into NaN rows) for an invalid request.
#pragma once

#include <cstdint>

#include "../common/params.h"

namespace jpa {
namespace cuda {

// Request status codes in ReqMeta::status.
constexpr int32_t kReqValid = 1;
constexpr int32_t kReqInvalid = 0;

struct ReqMeta {
  int32_t row_begin;  // first output row (token)
  int32_t q_len;      // rows owned
  int32_t kv_len;     // seq_lens[b]
  int32_t status;     // kReqValid / kReqInvalid
};

// Split-KV and workspace policy. Mirrored in jax_paged_attn/_workspace.py: keep them in sync.
constexpr int kMaxSplits = 64;
constexpr int kMinKeysPerSplit = 256;
constexpr int64_t kMaxTargetCtas = 2048;
constexpr int64_t kWsAlign = 256;
// Largest batch for AttnLaunch::longest_first (its per-CTA cost grows as batch^2).
constexpr int64_t kMaxLongestFirstBatch = 128;

__host__ __device__ inline int64_t align_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

// Workspace: [ReqMeta x batch][partial lse: splits x T x Hq floats][partial out: splits x T x
// Hq x D floats], each region aligned to kWsAlign bytes.
__host__ __device__ inline int64_t ws_meta_bytes(int64_t batch) {
  return align_up((batch > 0 ? batch : 1) * int64_t(sizeof(ReqMeta)), kWsAlign);
}
__host__ __device__ inline int64_t ws_split_bytes(int64_t splits, int64_t rows, int64_t head_dim) {
  return splits <= 1 ? 0
                     : align_up(splits * rows * 4, kWsAlign) +
                           align_up(splits * rows * head_dim * 4, kWsAlign);
}

// Everything a tile / merge kernel needs: the params plus what the launcher derived.
struct AttnLaunch {
  AttnParams p;
  ReqMeta* meta = nullptr;      // [batch]
  float* part_lse = nullptr;    // [splits, T, Hq] log2-domain lse of each split (split mode)
  float* part_out = nullptr;    // [splits, T, Hq, D] normalized partial outputs (split mode)
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
};

}  // namespace cuda
}  // namespace jpa
