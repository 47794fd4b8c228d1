// The mask policy: which keys a query row sees, which key tiles need masking, and the logit
// soft cap; one definition for every kernel family (CPU, sm80, sm90; docs/semantics.md).
#pragma once

#include <cmath>
#include <cstdint>

#include "macros.h"

namespace jpa {

// Is key j visible to a query at absolute position pos?
JPA_HD bool key_visible(int64_t pos, int64_t j, bool causal, int64_t window_left) {
  return (!causal || j <= pos) && (window_left < 0 || pos - j <= window_left);
}

// First key index any row of a request can see: keys before it are never read.
JPA_HD int64_t first_needed_key(int64_t kv_len, int64_t q_len, int64_t window_left) {
  if (window_left < 0) return 0;
  int64_t lo = kv_len - q_len - window_left;
  return lo > 0 ? lo : 0;
}

// Keys [lo, hi) that some row of a block of consecutive positions [pos_first, pos_last] of a
// request can see, clipped to [0, kv_len) (hi >= lo). Keys outside it are never read: the GPU
// tiles visit only this range, the CPU path a one-row block's.
JPA_HD void block_key_range(int64_t pos_first, int64_t pos_last, int64_t kv_len, bool causal,
                            int64_t window_left, int64_t* lo, int64_t* hi) {
  int64_t h = causal ? pos_last + 1 : kv_len;
  if (h > kv_len) h = kv_len;
  int64_t l = window_left >= 0 ? pos_first - window_left : 0;
  if (l < 0) l = 0;
  *lo = l;
  *hi = h < l ? l : h;
}

// Visible key range [lo, hi) of the row at position pos.
JPA_HD void visible_range(int64_t pos, int64_t kv_len, bool causal, int64_t window_left,
                          int64_t* lo, int64_t* hi) {
  block_key_range(pos, pos, kv_len, causal, window_left, lo, hi);
}

// Does every row of the block [pos_first, pos_last] see every key of the tile [j0, j1), all
// below `ke` (the end of the keys the caller visits)? Then the tile needs no per-element
// mask (key_visible); otherwise each logit is masked.
JPA_HD bool tile_all_visible(int64_t j0, int64_t j1, int64_t ke, int64_t pos_first,
                             int64_t pos_last, bool causal, int64_t window_left) {
  return j1 <= ke && (!causal || j1 - 1 <= pos_first) &&
         (window_left < 0 || pos_last - j0 <= window_left);
}

JPA_HD float apply_softcap(float s, float cap) {
  return cap > 0.0f ? cap * tanhf(s / cap) : s;
}

}  // namespace jpa
