// Address arithmetic shared by every kernel: where element (token, head, dim) of a strided
// operand lives, and where key j of a request lives in the paged cache.
#pragma once

#include <cstdint>

#include "macros.h"
#include "params.h"

namespace jpa {

JPA_HD int64_t token_elem(const TokenView& t, int64_t tok, int64_t head) {
  return tok * t.stride_tok + head * t.stride_head;
}

JPA_HD int64_t kv_elem(const PagedKV& kv, int64_t page, int64_t slot, int64_t head) {
  return page * kv.page_stride + slot * kv.slot_stride + head * kv.head_stride;
}

JPA_HD int64_t out_elem(const AttnParams& p, int64_t tok, int64_t head) {
  return (tok * p.num_q_heads + head) * p.head_dim;
}

// Physical page holding key j of request b (unchecked; see page_in_range).
JPA_HD int64_t page_of_key(const AttnParams& p, int64_t b, int64_t j) {
  return p.block_tables[b * p.max_pages_per_req + j / p.kv.page_size];
}

JPA_HD bool page_in_range(const PagedKV& kv, int64_t page) {
  return page >= 0 && page < kv.num_pages;
}

}  // namespace jpa
