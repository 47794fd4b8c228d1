// XLA FFI handlers for the CUDA platform: decode into params (the same code as the CPU path),
// launch on XLA's stream, report launch errors. Command-buffer compatible: nothing here reads
// device memory or synchronizes, and the split-KV workspace is an XLA-allocated output.
#include <string>

#include "../cuda/launchers.h"
#include "bindings.h"
#include "fill_params.h"
#include "handlers.h"

namespace jpa {
namespace {

using S32Buf = ffi::Buffer<ffi::S32>;
using F32Buf = ffi::Buffer<ffi::F32>;
using Stream = ffi::PlatformStream<cudaStream_t>;

ffi::Error CudaError(cudaError_t err, const char* what) {
  return ffi::Error(ffi::ErrorCode::kInternal,
                    std::string("jax_paged_attn: ") + what + ": " + cudaGetErrorString(err));
}

ffi::Error RunAttention(cudaStream_t stream, const AttentionBuffers& bufs,
                        ffi::AnyBuffer workspace, const AttentionAttrs& attrs) {
  AttnParams p;
  if (auto e = FillAttentionParams(bufs, attrs, &p); e.failure()) return e;
  p.workspace = workspace.untyped_data();
  p.workspace_bytes = static_cast<int64_t>(workspace.size_bytes());
  cudaError_t err = p.is_decode() ? LaunchPagedDecode(p, stream) : LaunchPagedPrefill(p, stream);
  if (err != cudaSuccess) return CudaError(err, p.is_decode() ? "paged_decode" : "paged_prefill");
  return ffi::Error::Success();
}

ffi::Error DecodeCuda(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                      S32Buf bt, S32Buf sl, F32Buf scales, F32Buf sinks,
                      ffi::Result<ffi::AnyBuffer> out, ffi::Result<F32Buf> lse,
                      ffi::Result<ffi::AnyBuffer> workspace, AttentionAttrs attrs) {
  return RunAttention(stream, {q, k, v, bt, sl, std::nullopt, scales, sinks, *out, *lse},
                      *workspace, attrs);
}

ffi::Error PrefillCuda(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k,
                       ffi::AnyBuffer v, S32Buf bt, S32Buf sl, S32Buf cu, F32Buf scales,
                       F32Buf sinks, ffi::Result<ffi::AnyBuffer> out, ffi::Result<F32Buf> lse,
                       ffi::Result<ffi::AnyBuffer> workspace, AttentionAttrs attrs) {
  return RunAttention(stream, {q, k, v, bt, sl, cu, scales, sinks, *out, *lse}, *workspace,
                      attrs);
}

ffi::Error AppendCuda(cudaStream_t stream, ffi::AnyBuffer, ffi::AnyBuffer, ffi::AnyBuffer k,
                      ffi::AnyBuffer v, S32Buf slots, F32Buf scales,
                      ffi::Result<ffi::AnyBuffer> k_out, ffi::Result<ffi::AnyBuffer> v_out,
                      AppendAttrs attrs) {
  AppendParams p;
  if (auto e = FillAppendParams({*k_out, *v_out, k, v, slots, scales}, attrs, &p); e.failure())
    return e;
  cudaError_t err = LaunchAppendKV(p, stream);
  if (err != cudaSuccess) return CudaError(err, "append_kv");
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jpa

XLA_FFI_DEFINE_HANDLER_SYMBOL(jpa_paged_decode_cuda, jpa::DecodeCuda,
                              jpa::BindAttentionOperands<false>(
                                  xla::ffi::Ffi::Bind().Ctx<jpa::Stream>())
                                  .Ret<xla::ffi::AnyBuffer>()  // workspace
                                  .Attrs<jpa::AttentionAttrs>(),
                              {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(jpa_paged_prefill_cuda, jpa::PrefillCuda,
                              jpa::BindAttentionOperands<true>(
                                  xla::ffi::Ffi::Bind().Ctx<jpa::Stream>())
                                  .Ret<xla::ffi::AnyBuffer>()  // workspace
                                  .Attrs<jpa::AttentionAttrs>(),
                              {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(jpa_append_kv_cuda, jpa::AppendCuda,
                              jpa::BindAppendOperands(xla::ffi::Ffi::Bind().Ctx<jpa::Stream>())
                                  .Attrs<jpa::AppendAttrs>(),
                              {xla::ffi::Traits::kCmdBufferCompatible});
