// Handler symbols the nanobind module hands out as capsules.
#pragma once

#include "xla/ffi/api/c_api.h"

extern "C" {
XLA_FFI_Error* jpa_paged_decode_cpu(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* jpa_paged_prefill_cpu(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* jpa_append_kv_cpu(XLA_FFI_CallFrame* call_frame);
#ifdef JPA_WITH_CUDA
XLA_FFI_Error* jpa_paged_decode_cuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* jpa_paged_prefill_cuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* jpa_append_kv_cuda(XLA_FFI_CallFrame* call_frame);
#endif
}
