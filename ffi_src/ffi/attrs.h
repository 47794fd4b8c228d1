// The static attributes each custom call carries, decoded by XLA FFI straight into a struct
// (names must match jax_paged_attn/primitives.py).
#pragma once

#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace jpa {

struct AttentionAttrs {
  int64_t q_offset;                            // view offset into the query base buffer
  xla::ffi::Span<const int64_t> q_strides;     // [token_stride, head_stride]
  int64_t num_q_heads;
  int64_t kv_layout;                           // 0 = NHD, 1 = HND
  int64_t kv_combined;                         // 1: k_pages is [P, 2, ...], v_pages unused
  float sm_scale;
  float softcap;                               // 0: none
  int64_t window_left;
  int64_t causal;
  int64_t q_len_per_req;                       // decode
  int64_t max_q_len;                           // prefill
  // The CUDA launcher's switches (jax_paged_attn/launch_options.py; the CPU path ignores
  // them): kernel family (0 = the device's default, 1 = sm80), mixed-batch split launch,
  // forced prefill tile rows (0, 64, 128), longest request first (decode), split decode
  // merged by its tile CTAs (1, experimental) or by a merge launch (0), forced KV split
  // count (0: the launcher's choice).
  int64_t launch_family;
  int64_t launch_mixed;
  int64_t launch_tile_rows;
  int64_t launch_longest_first;
  int64_t launch_fused_merge;
  int64_t launch_splits;
};

struct AppendAttrs {
  int64_t k_offset;
  xla::ffi::Span<const int64_t> k_strides;
  int64_t v_offset;
  xla::ffi::Span<const int64_t> v_strides;
  int64_t kv_layout;
  int64_t kv_combined;
};

}  // namespace jpa

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(
    ::jpa::AttentionAttrs, ::xla::ffi::StructMember<int64_t>("q_offset"),
    ::xla::ffi::StructMember<::xla::ffi::Span<const int64_t>>("q_strides"),
    ::xla::ffi::StructMember<int64_t>("num_q_heads"),
    ::xla::ffi::StructMember<int64_t>("kv_layout"),
    ::xla::ffi::StructMember<int64_t>("kv_combined"),
    ::xla::ffi::StructMember<float>("sm_scale"), ::xla::ffi::StructMember<float>("softcap"),
    ::xla::ffi::StructMember<int64_t>("window_left"),
    ::xla::ffi::StructMember<int64_t>("causal"),
    ::xla::ffi::StructMember<int64_t>("q_len_per_req"),
    ::xla::ffi::StructMember<int64_t>("max_q_len"),
    ::xla::ffi::StructMember<int64_t>("launch_family"),
    ::xla::ffi::StructMember<int64_t>("launch_mixed"),
    ::xla::ffi::StructMember<int64_t>("launch_tile_rows"),
    ::xla::ffi::StructMember<int64_t>("launch_longest_first"),
    ::xla::ffi::StructMember<int64_t>("launch_fused_merge"),
    ::xla::ffi::StructMember<int64_t>("launch_splits"));

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(
    ::jpa::AppendAttrs, ::xla::ffi::StructMember<int64_t>("k_offset"),
    ::xla::ffi::StructMember<::xla::ffi::Span<const int64_t>>("k_strides"),
    ::xla::ffi::StructMember<int64_t>("v_offset"),
    ::xla::ffi::StructMember<::xla::ffi::Span<const int64_t>>("v_strides"),
    ::xla::ffi::StructMember<int64_t>("kv_layout"),
    ::xla::ffi::StructMember<int64_t>("kv_combined"));
