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

JPA_HD bool page_in_range(const PagedKV& kv, int64_t page) {
  return page >= 0 && page < kv.num_pages;
}

// Where key j of a request sits: its column of the block-table row (`pi`) and its slot in
// that page. `page_shift` is log2(page_size) for a power of two (a shift and a mask), else
// -1. I is the key index type: int on the GPU (the launcher bounds keys below 2^31, and
// 32-bit division is the fast one), int64_t on the CPU.
template <class I>
struct KeySlot {
  I pi, slot;
};
template <class I>
JPA_HD KeySlot<I> key_slot(const PagedKV& kv, I j, int page_shift) {
  const I ps = I(kv.page_size);
  if (page_shift >= 0) return {j >> page_shift, j & (ps - 1)};
  const I pi = j / ps;
  return {pi, j - pi * ps};
}

// The guard of every page lookup: the element offset of (page, slot)'s row for KV head
// `head`, or -1 when `page` (read from the block table) lies outside [0, num_pages); such an
// index is never turned into an address.
JPA_HD int64_t page_row_elem(const PagedKV& kv, int64_t page, int64_t slot, int64_t head) {
  return page_in_range(kv, page) ? kv_elem(kv, page, slot, head) : -1;
}

// The one guarded page lookup of every kernel (CPU, sm80, sm90): the element offset of key
// j's row for KV head `head`, or -1 (page_row_elem). `bt_row` is the request's block-table
// row. (The sm90 loader runs the two steps apart, to start the block-table load early.)
template <class I>
JPA_HD int64_t key_row_elem(const PagedKV& kv, const int32_t* bt_row, I j, int page_shift,
                            int64_t head) {
  const KeySlot<I> ks = key_slot(kv, j, page_shift);
  return page_row_elem(kv, bt_row[ks.pi], ks.slot, head);
}

}  // namespace jpa
