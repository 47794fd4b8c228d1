// Masking and logit transforms, one definition for every kernel (see docs/semantics.md).
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

// Visible key range [lo, hi) of the row at position pos (hi exclusive), clipped to [0, kv_len).
JPA_HD void visible_range(int64_t pos, int64_t kv_len, bool causal, int64_t window_left,
                          int64_t* lo, int64_t* hi) {
  int64_t h = causal ? pos + 1 : kv_len;
  if (h > kv_len) h = kv_len;
  int64_t l = window_left >= 0 ? pos - window_left : 0;
  if (l < 0) l = 0;
  *lo = l;
  *hi = h;
}

JPA_HD float apply_softcap(float s, float cap) {
  return cap > 0.0f ? cap * tanhf(s / cap) : s;
}

}  // namespace jpa
