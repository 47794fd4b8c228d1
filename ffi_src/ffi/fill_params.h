// The one place where XLA FFI buffers and attributes become the kernels' params structs.
// Everything here is checked (shapes, dtypes, view bounds) so that launchers and kernels can
// trust the structs; a failed check is an FFI error with a message, never a crash.
#pragma once

#include <optional>

#include "../common/params.h"
#include "attrs.h"
#include "xla/ffi/api/ffi.h"

namespace jpa {

namespace ffi = xla::ffi;

struct AttentionBuffers {
  ffi::AnyBuffer q;
  ffi::AnyBuffer k_pages;
  ffi::AnyBuffer v_pages;
  ffi::Buffer<ffi::S32> block_tables;
  ffi::Buffer<ffi::S32> seq_lens;
  std::optional<ffi::Buffer<ffi::S32>> cu_seqlens_q;  // prefill only
  ffi::Buffer<ffi::F32> scales;
  ffi::Buffer<ffi::F32> sinks;  // [Hq] or [0]
  ffi::AnyBuffer out;           // result 0
  ffi::Buffer<ffi::F32> lse;    // result 1
};

ffi::Error FillAttentionParams(const AttentionBuffers& b, const AttentionAttrs& a,
                               AttnParams* p);

struct AppendBuffers {
  ffi::AnyBuffer k_pages_out;  // aliased with the k_pages input
  ffi::AnyBuffer v_pages_out;
  ffi::AnyBuffer k;
  ffi::AnyBuffer v;
  ffi::Buffer<ffi::S32> slot_mapping;
  ffi::Buffer<ffi::F32> scales;
};

ffi::Error FillAppendParams(const AppendBuffers& b, const AppendAttrs& a, AppendParams* p);

}  // namespace jpa
