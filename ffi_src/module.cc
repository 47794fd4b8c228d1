// The Python extension: it hands out the FFI handlers as capsules (registration happens in
// jax_paged_attn/_registry.py through jax.ffi.register_ffi_target), and the one fact the
// Python lowering must not re-derive: the size of the CUDA attention workspace, the CUDA
// kernels' shape limits, and which CUDA kernel families the build holds.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <string>

#include "common/gpu_limits.h"
#include "common/workspace.h"
#include "ffi/handlers.h"

namespace nb = nanobind;

namespace {

template <typename Fn>
nb::capsule Capsule(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

NB_MODULE(_jpa_ffi, m) {
  m.def("cpu_targets", []() {
    nb::dict d;
    d["jpa_paged_decode"] = Capsule(jpa_paged_decode_cpu);
    d["jpa_paged_prefill"] = Capsule(jpa_paged_prefill_cpu);
    d["jpa_append_kv"] = Capsule(jpa_append_kv_cpu);
    return d;
  });
  m.def("attention_workspace_bytes", &jpa::ws::attention_workspace_bytes,
        nb::arg("num_tokens"), nb::arg("num_q_heads"), nb::arg("num_kv_heads"),
        nb::arg("head_dim"), nb::arg("batch"), nb::arg("max_pages_per_req"),
        nb::arg("page_size"), nb::arg("max_q_len"), nb::arg("mixed_split") = false,
        "Bytes of the workspace output of a CUDA decode / prefill call (never zero); "
        "mixed_split: a prefill call lowered with the mixed split launch.");
  // The most KV splits a launch takes (the JPA_CUDA_SPLITS switch's range).
  m.attr("max_kv_splits") = jpa::ws::kMaxSplits;
  m.def("gpu_shape_limit",
        [](int64_t num_tokens, int64_t num_q_heads, int64_t group, int64_t head_dim,
           int64_t batch, int64_t max_pages_per_req, int64_t page_size, int64_t max_q_len) {
          const char* why = jpa::gpu_shape_limit(num_tokens, num_q_heads, group, head_dim,
                                                 batch, max_pages_per_req, page_size,
                                                 max_q_len);
          return std::string(why == nullptr ? "" : why);
        },
        nb::arg("num_tokens"), nb::arg("num_q_heads"), nb::arg("group"), nb::arg("head_dim"),
        nb::arg("batch"), nb::arg("max_pages_per_req"), nb::arg("page_size"),
        nb::arg("max_q_len"),
        "Why a CUDA attention call of these shapes cannot run (\"\" if it can).");
  m.def("cuda_kernel_families", []() {
    nb::list l;
#ifdef JPA_WITH_CUDA
    l.append("sm80");
#endif
#ifdef JPA_WITH_SM90
    l.append("sm90");
#endif
    return l;
  }, "The CUDA kernel families compiled into this build (the launcher picks one per call).");
  m.def("cuda_targets", []() {
    nb::dict d;
#ifdef JPA_WITH_CUDA
    d["jpa_paged_decode"] = Capsule(jpa_paged_decode_cuda);
    d["jpa_paged_prefill"] = Capsule(jpa_paged_prefill_cuda);
    d["jpa_append_kv"] = Capsule(jpa_append_kv_cuda);
#endif
    return d;
  });
}
