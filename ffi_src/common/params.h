// The one description of an attention or append call that every kernel (CPU and CUDA) reads.
// Filled in exactly one place (ffi_src/ffi/fill_params.cc) from XLA FFI buffers and
// attributes; kernels and launchers never re-derive shapes or strides. All strides are in
// elements; the innermost (head_dim) stride is always 1. Pointers already include any view
// offset.
#pragma once

#include <cstdint>

#include "dtypes.h"

namespace jpa {

// A strided [tokens, heads, head_dim] operand (query, or new K/V for append).
struct TokenView {
  const void* ptr = nullptr;
  DType dtype = DType::kInvalid;
  int64_t stride_tok = 0;
  int64_t stride_head = 0;
};

// The paged KV cache. For combined pages ([P, 2, ...]) `v` points `v_offset` elements past `k`
// inside the same buffer and the page stride covers both halves.
struct PagedKV {
  void* k = nullptr;
  void* v = nullptr;
  DType dtype = DType::kInvalid;
  int64_t num_pages = 0;
  int64_t page_size = 0;
  int64_t num_heads = 0;
  int64_t page_stride = 0;
  int64_t slot_stride = 0;
  int64_t head_stride = 0;
};

// The CUDA launcher's switches for one call, fixed when the call was lowered (custom-call
// attributes from jax_paged_attn/launch_options.py). The CPU path ignores them.
struct LaunchSwitches {
  bool force_sm80 = false;     // false: the device's default family (sm90 prefill on 9.0)
  bool mixed_split = false;    // mixed batches: a 16-row-shape launch for the short requests
  int tile_rows = 0;           // 0: by the rows; 64 or 128 force a prefill tile shape
  bool longest_first = true;   // decode with fused checks: longest request first
  bool fused_merge = false;    // split decode with fused checks: the tiles merge their splits
  int splits = 0;              // 0: the launcher picks the KV splits; n: at most n (its cap)
};

struct AttnParams {
  // Query [num_tokens, num_q_heads, head_dim].
  TokenView q;
  int64_t num_tokens = 0;
  int64_t num_q_heads = 0;
  int64_t head_dim = 0;

  PagedKV kv;

  // Metadata (device memory on the GPU path).
  const int32_t* block_tables = nullptr;  // [batch, max_pages_per_req]
  int64_t max_pages_per_req = 0;
  const int32_t* seq_lens = nullptr;       // [batch]
  int64_t batch = 0;
  const int32_t* cu_seqlens_q = nullptr;   // [batch + 1]; null for decode
  int64_t q_len_per_req = 1;               // decode only
  int64_t max_q_len = 0;                   // prefill: static bound on any request's q length

  const float* scales = nullptr;  // [k_scale, v_scale], runtime values
  const float* sinks = nullptr;   // [num_q_heads] or null

  float sm_scale = 1.0f;
  float softcap = 0.0f;           // 0: no soft cap
  int64_t window_left = -1;       // -1: no window
  bool causal = true;

  // Outputs: out [num_tokens, num_q_heads, head_dim] contiguous, lse [num_tokens, num_q_heads].
  void* out = nullptr;
  DType out_dtype = DType::kInvalid;
  float* lse = nullptr;

  LaunchSwitches launch;

  // Scratch for split-KV partials (GPU only): an extra XLA output, never read before written.
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;

  int64_t group_size() const { return num_q_heads / kv.num_heads; }
  bool is_decode() const { return cu_seqlens_q == nullptr; }
};

struct AppendParams {
  TokenView k;  // [num_tokens, num_kv_heads, head_dim]
  TokenView v;
  int64_t num_tokens = 0;
  int64_t head_dim = 0;
  PagedKV kv;  // written in place (aliased input/output)
  const int32_t* slot_mapping = nullptr;  // [num_tokens]
  const float* scales = nullptr;          // [k_scale, v_scale]
};

}  // namespace jpa
