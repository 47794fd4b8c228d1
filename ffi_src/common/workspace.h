// The CUDA attention workspace: its layout, the split-KV policy's limits, and its size.
//
// The size is decided at trace time from static shapes only: the CUDA lowering asks the
// extension module (module.cc, `attention_workspace_bytes`) and appends one uint8 output of
// that many bytes to the custom call, so XLA allocates it and the call stays CUDA-graph safe.
// The launcher (cuda/attn_launch.cu) then picks the number of KV splits S from the device
// and never more than this workspace holds. Written once, here, for both sides; plain C++
// (no CUDA headers) because a CPU-only build lowers for CUDA too.
//
// Layout: [ReqMeta x batch], then with S > 1 splits [arrival counts: batch x Hkv int32]
// [partial lse: S x T x Hq f32][partial out: S x T x Hq x D f32], each region aligned to
// kWsAlign bytes. The counts serve the fused merge of split decode (the launcher zeroes them
// before the tiles; the last split CTA of each (request, KV head) merges its rows). A prefill
// lowered with the mixed split launch has one more region at the end (has_small_region).
#pragma once

#include <cstdint>

#include "macros.h"

namespace jpa {

// Per-request facts the prepare kernel stores for the tile and merge kernels.
struct ReqMeta {
  int32_t row_begin;  // first output row (token)
  int32_t q_len;      // rows owned
  int32_t kv_len;     // seq_lens[b]
  int32_t status;     // kReqValid / kReqInvalid (cuda/attn_common.cuh)
};

namespace ws {

constexpr int kMaxSplits = 64;              // KV splits of one row block, at most
constexpr int kMinKeysPerSplit = 256;       // of the block table's capacity, per split
constexpr int64_t kMaxTargetCtas = 2048;    // the grid the split count aims for, at most
constexpr int64_t kWsAlign = 256;
constexpr int64_t kMaxSplitBytes = int64_t(512) << 20;   // never reserve more for partials
// Rows (token x group head) per CTA of the tile shapes: decode (<= 16 rows), 64, 128.
// (head_dim 256 uses 64 where the others use 128: fewer rows per CTA can only mean fewer
// splits, so 128 gives an upper bound for every head_dim.)
constexpr int64_t kBlockRows[3] = {16, 64, 128};

JPA_HD int64_t align_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

// Rows per CTA of the tile shape for requests of up to `rows` packed rows (the launcher's
// shape choice; head_dim 256 then halves the 128).
inline int64_t block_rows_for(int64_t rows) {
  for (int64_t r : kBlockRows)
    if (rows <= r) return r;
  return kBlockRows[2];
}

JPA_HD int64_t meta_bytes(int64_t batch) {
  return align_up((batch > 0 ? batch : 1) * int64_t(sizeof(ReqMeta)), kWsAlign);
}

JPA_HD int64_t count_bytes(int64_t batch, int64_t num_kv_heads) {
  return align_up((batch > 0 ? batch : 1) * num_kv_heads * 4, kWsAlign);
}

JPA_HD int64_t split_bytes(int64_t splits, int64_t rows, int64_t head_dim) {
  return splits <= 1 ? 0
                     : align_up(splits * rows * 4, kWsAlign) +
                           align_up(splits * rows * head_dim * 4, kWsAlign);
}

// The most KV splits the launcher may choose for these static shapes on any GPU.
inline int64_t splits_upper_bound(int64_t num_q_heads, int64_t num_kv_heads, int64_t batch,
                                  int64_t max_pages_per_req, int64_t page_size,
                                  int64_t max_q_len) {
  if (batch <= 0 || num_q_heads <= 0 || num_kv_heads <= 0) return 1;
  const int64_t rows = max_q_len * (num_q_heads / num_kv_heads);
  const int64_t bm = block_rows_for(rows);
  const int64_t base = batch * num_kv_heads * ((rows + bm - 1) / bm);
  if (base <= 0 || base >= kMaxTargetCtas) return 1;
  int64_t splits = (kMaxTargetCtas + base - 1) / base;
  const int64_t by_keys = (max_pages_per_req * page_size) / kMinKeysPerSplit;
  if (splits > kMaxSplits) splits = kMaxSplits;
  if (splits > by_keys) splits = by_keys;
  return splits < 1 ? 1 : splits;
}

// Mixed batches with the mixed split launch (JPA_CUDA_MIXED=1; prefill calls whose requests
// may have more than 16 packed rows, with G <= 16): the 16-row launch serving the short
// requests has its own split count and its own region after the rest:
// [counts: B x Hkv int32][lse: S x B x Hkv x 16 f32][out: S x B x Hkv x 16 x D f32], one
// partial row per (split, request, KV head, packed row) whatever the request's tokens.
constexpr int64_t kSmallBlockRows = kBlockRows[0];

JPA_HD bool has_small_region(bool mixed_split, int64_t num_q_heads, int64_t num_kv_heads,
                             int64_t max_q_len) {
  const int64_t G = num_kv_heads > 0 ? num_q_heads / num_kv_heads : 0;
  return mixed_split && G >= 1 && G <= kSmallBlockRows && max_q_len * G > kSmallBlockRows;
}

JPA_HD int64_t small_rows(int64_t batch, int64_t num_kv_heads) {
  return (batch > 0 ? batch : 1) * num_kv_heads * kSmallBlockRows;
}

JPA_HD int64_t small_region_bytes(int64_t splits, int64_t batch, int64_t num_kv_heads,
                                  int64_t head_dim) {
  return splits <= 1 ? 0
                     : count_bytes(batch, num_kv_heads) +
                           split_bytes(splits, small_rows(batch, num_kv_heads), head_dim);
}

// The most splits of `rows` partial rows under kMaxSplitBytes, from `splits` down.
inline int64_t splits_that_fit(int64_t splits, int64_t rows, int64_t head_dim) {
  while (splits > 1 && split_bytes(splits, rows, head_dim) > kMaxSplitBytes) --splits;
  return splits;
}

// Bytes of the workspace output of a CUDA decode / prefill call (never zero). mixed_split:
// the call is a prefill lowered with the mixed split launch.
inline int64_t attention_workspace_bytes(int64_t num_tokens, int64_t num_q_heads,
                                         int64_t num_kv_heads, int64_t head_dim,
                                         int64_t batch, int64_t max_pages_per_req,
                                         int64_t page_size, int64_t max_q_len,
                                         bool mixed_split = false) {
  const int64_t rows = num_tokens * num_q_heads;
  const int64_t splits = splits_that_fit(
      splits_upper_bound(num_q_heads, num_kv_heads, batch, max_pages_per_req, page_size,
                         max_q_len),
      rows, head_dim);
  int64_t bytes = meta_bytes(batch) +
                  (splits > 1 ? count_bytes(batch, num_kv_heads) +
                                    split_bytes(splits, rows, head_dim)
                              : 0);
  if (has_small_region(mixed_split, num_q_heads, num_kv_heads, max_q_len)) {
    // The short requests' launch: one row block per request and KV head (max_q_len 1 gives
    // that base).
    const int64_t small = splits_that_fit(
        splits_upper_bound(num_q_heads, num_kv_heads, batch, max_pages_per_req, page_size, 1),
        small_rows(batch, num_kv_heads), head_dim);
    bytes += small_region_bytes(small, batch, num_kv_heads, head_dim);
  }
  return bytes;
}

}  // namespace ws
}  // namespace jpa
