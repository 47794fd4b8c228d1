// Operand/result binding shared by the CPU and CUDA handlers, so both platforms decode the
// same custom-call signature (see jax_paged_attn/primitives.py for the Python side).
//
//   attention: q, k_pages, v_pages, block_tables, seq_lens, [cu_seqlens_q], scales, sinks
//              -> out, lse, [workspace (CUDA)]
//   append:    k_pages, v_pages, k, v, slot_mapping, scales -> k_pages, v_pages (aliased)
#pragma once

#include <utility>

#include "attrs.h"
#include "xla/ffi/api/ffi.h"

namespace jpa {

namespace ffi = xla::ffi;

template <bool kPrefill, typename Binding>
auto BindAttentionOperands(Binding b) {
  auto common = std::move(b).template Arg<ffi::AnyBuffer>()        // q base buffer
                    .template Arg<ffi::AnyBuffer>()     // k_pages (or combined pages)
                    .template Arg<ffi::AnyBuffer>()     // v_pages (empty when combined)
                    .template Arg<ffi::Buffer<ffi::S32>>()   // block_tables
                    .template Arg<ffi::Buffer<ffi::S32>>();  // seq_lens
  if constexpr (kPrefill) {
    return std::move(common).template Arg<ffi::Buffer<ffi::S32>>()  // cu_seqlens_q
        .template Arg<ffi::Buffer<ffi::F32>>()            // scales
        .template Arg<ffi::Buffer<ffi::F32>>()            // sinks
        .template Ret<ffi::AnyBuffer>()                   // out
        .template Ret<ffi::Buffer<ffi::F32>>();           // lse
  } else {
    return std::move(common).template Arg<ffi::Buffer<ffi::F32>>()
        .template Arg<ffi::Buffer<ffi::F32>>()
        .template Ret<ffi::AnyBuffer>()
        .template Ret<ffi::Buffer<ffi::F32>>();
  }
}

template <typename Binding>
auto BindAppendOperands(Binding b) {
  return std::move(b).template Arg<ffi::AnyBuffer>()  // k_pages (aliased to result 0)
      .template Arg<ffi::AnyBuffer>()            // v_pages (aliased to result 1)
      .template Arg<ffi::AnyBuffer>()            // k base buffer
      .template Arg<ffi::AnyBuffer>()            // v base buffer
      .template Arg<ffi::Buffer<ffi::S32>>()     // slot_mapping
      .template Arg<ffi::Buffer<ffi::F32>>()     // scales
      .template Ret<ffi::AnyBuffer>()            // k_pages out
      .template Ret<ffi::AnyBuffer>();           // v_pages out
}

}  // namespace jpa
