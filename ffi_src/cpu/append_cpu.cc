// KV-cache append on the CPU: scatter each new token into its page slot (in place: the page
// buffers are the aliased outputs).
#include "../common/index.h"
#include "cpu_kernels.h"

namespace jpa {

void RunAppendCpu(const AppendParams& p) {
  const int64_t capacity = p.kv.num_pages * p.kv.page_size;
  const float k_scale = p.scales[0];
  const float v_scale = p.scales[1];
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    const int64_t slot = p.slot_mapping[t];
    if (slot < 0 || slot >= capacity) continue;  // skipped token
    const int64_t page = slot / p.kv.page_size;
    const int64_t in_page = slot % p.kv.page_size;
    for (int64_t h = 0; h < p.kv.num_heads; ++h) {
      const int64_t dst = kv_elem(p.kv, page, in_page, h);
      const int64_t ks = token_elem(p.k, t, h);
      const int64_t vs = token_elem(p.v, t, h);
      for (int64_t d = 0; d < p.head_dim; ++d) {
        // store_from_float rounds to nearest even; for fp8 it saturates at +-448, which is the
        // clip of the semantics.
        store_from_float(p.kv.k, dst + d, p.kv.dtype,
                         load_as_float(p.k.ptr, ks + d, p.k.dtype) / k_scale);
        store_from_float(p.kv.v, dst + d, p.kv.dtype,
                         load_as_float(p.v.ptr, vs + d, p.v.dtype) / v_scale);
      }
    }
  }
}

}  // namespace jpa
