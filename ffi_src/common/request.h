// Per-request bookkeeping: which rows a request owns, its KV length, and whether its runtime
// metadata is valid (docs/semantics.md, "Invalid runtime metadata"). Page-index validity is
// not decided here: it depends on which pages a kernel reads, see pages_valid().
#pragma once

#include <cstdint>

#include "index.h"
#include "macros.h"
#include "params.h"

namespace jpa {

struct RequestInfo {
  int64_t row_begin;  // first output row
  int64_t q_len;      // number of rows owned
  int64_t kv_len;     // seq_lens[b]
  bool valid;         // rules 1-2 of the semantics (page indices checked separately)
};

JPA_HD int64_t clamp64(int64_t x, int64_t lo, int64_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// request_info() given run_max = max(cu_seqlens_q[0..b]) (prefill; ignored for decode), so a
// GPU block can compute that maximum cooperatively. request_info() is exactly this with the
// running maximum computed serially.
JPA_HD RequestInfo request_info_with_run_max(const AttnParams& p, int64_t b, int64_t run_max) {
  RequestInfo r;
  r.kv_len = p.seq_lens[b];
  bool ok = true;
  if (p.cu_seqlens_q == nullptr) {
    r.row_begin = b * p.q_len_per_req;
    r.q_len = p.q_len_per_req;
  } else {
    int64_t start = p.cu_seqlens_q[b];
    int64_t end = p.cu_seqlens_q[b + 1];
    int64_t e0 = clamp64(run_max, 0, p.num_tokens);
    int64_t e1 = clamp64(end > run_max ? end : run_max, 0, p.num_tokens);
    r.row_begin = e0;
    r.q_len = e1 - e0;
    ok = start >= 0 && end >= start && start >= run_max && end <= p.num_tokens &&
         (end - start) <= p.max_q_len;
  }
  ok = ok && r.kv_len >= 0 && r.kv_len >= r.q_len &&
       r.kv_len <= p.max_pages_per_req * p.kv.page_size;
  r.valid = ok;
  return r;
}

JPA_HD RequestInfo request_info(const AttnParams& p, int64_t b) {
  int64_t run_max = 0;
  if (p.cu_seqlens_q != nullptr) {
    // Running maximum of cu[0..b], so row ranges never overlap whatever the metadata.
    run_max = p.cu_seqlens_q[0];
    for (int64_t i = 1; i <= b; ++i) {
      int64_t c = p.cu_seqlens_q[i];
      run_max = c > run_max ? c : run_max;
    }
  }
  return request_info_with_run_max(p, b, run_max);
}

// Are the pages holding keys [lo, hi) of request b all inside [0, num_pages)?
// Only meaningful for a request whose RequestInfo is valid.
JPA_HD bool pages_valid(const AttnParams& p, int64_t b, int64_t lo, int64_t hi) {
  if (hi <= lo) return true;
  int64_t first = lo / p.kv.page_size;
  int64_t last = (hi - 1) / p.kv.page_size;
  for (int64_t i = first; i <= last; ++i) {
    if (!page_in_range(p.kv, p.block_tables[b * p.max_pages_per_req + i])) return false;
  }
  return true;
}

}  // namespace jpa
