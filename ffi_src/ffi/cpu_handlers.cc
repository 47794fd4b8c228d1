// XLA FFI handlers for the CPU platform: decode into params, run the CPU kernel.
#include "../cpu/cpu_kernels.h"
#include "bindings.h"
#include "fill_params.h"
#include "handlers.h"

namespace jpa {
namespace {

using S32Buf = ffi::Buffer<ffi::S32>;
using F32Buf = ffi::Buffer<ffi::F32>;

ffi::Error RunAttention(const AttentionBuffers& bufs, const AttentionAttrs& attrs) {
  AttnParams p;
  if (auto e = FillAttentionParams(bufs, attrs, &p); e.failure()) return e;
  RunAttentionCpu(p);
  return ffi::Error::Success();
}

ffi::Error DecodeCpu(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, S32Buf bt,
                     S32Buf sl, F32Buf scales, F32Buf sinks, ffi::Result<ffi::AnyBuffer> out,
                     ffi::Result<F32Buf> lse, AttentionAttrs attrs) {
  return RunAttention({q, k, v, bt, sl, std::nullopt, scales, sinks, *out, *lse}, attrs);
}

ffi::Error PrefillCpu(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, S32Buf bt,
                      S32Buf sl, S32Buf cu, F32Buf scales, F32Buf sinks,
                      ffi::Result<ffi::AnyBuffer> out, ffi::Result<F32Buf> lse,
                      AttentionAttrs attrs) {
  return RunAttention({q, k, v, bt, sl, cu, scales, sinks, *out, *lse}, attrs);
}

ffi::Error AppendCpu(ffi::AnyBuffer, ffi::AnyBuffer, ffi::AnyBuffer k, ffi::AnyBuffer v,
                     S32Buf slots, F32Buf scales, ffi::Result<ffi::AnyBuffer> k_out,
                     ffi::Result<ffi::AnyBuffer> v_out, AppendAttrs attrs) {
  // Inputs 0/1 alias results 0/1 (the jitted module donates or copies the cache once).
  AppendParams p;
  if (auto e = FillAppendParams({*k_out, *v_out, k, v, slots, scales}, attrs, &p); e.failure())
    return e;
  RunAppendCpu(p);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jpa

XLA_FFI_DEFINE_HANDLER_SYMBOL(jpa_paged_decode_cpu, jpa::DecodeCpu,
                              jpa::BindAttentionOperands<false>(xla::ffi::Ffi::Bind())
                                  .Attrs<jpa::AttentionAttrs>(),
                              {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(jpa_paged_prefill_cpu, jpa::PrefillCpu,
                              jpa::BindAttentionOperands<true>(xla::ffi::Ffi::Bind())
                                  .Attrs<jpa::AttentionAttrs>(),
                              {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(jpa_append_kv_cpu, jpa::AppendCpu,
                              jpa::BindAppendOperands(xla::ffi::Ffi::Bind())
                                  .Attrs<jpa::AppendAttrs>(),
                              {xla::ffi::Traits::kCmdBufferCompatible});
