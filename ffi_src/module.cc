// The Python extension: it only hands out the FFI handlers as capsules (registration happens
// in jax_paged_attn/_registry.py through jax.ffi.register_ffi_target).
#include <nanobind/nanobind.h>

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
