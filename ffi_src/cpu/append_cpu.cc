// KV-cache append on the CPU: scatter each new token into its page slot (in place: the page
// buffers are the aliased outputs).
#include "../common/index.h"
#include "cpu_kernels.h"

namespace jpa {
namespace {

float QuantizeInput(float x, float scale, DType page_dtype) {
  float y = x / scale;
  if (page_dtype == DType::kF8E4M3) y = y > 448.0f ? 448.0f : (y < -448.0f ? -448.0f : y);
  return y;
}

}  // namespace

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
        store_from_float(p.kv.k, dst + d, p.kv.dtype,
                         QuantizeInput(load_as_float(p.k.ptr, ks + d, p.k.dtype), k_scale, p.kv.dtype));
        store_from_float(p.kv.v, dst + d, p.kv.dtype,
                         QuantizeInput(load_as_float(p.v.ptr, vs + d, p.v.dtype), v_scale, p.kv.dtype));
      }
    }
  }
}

}  // namespace jpa
