#include "fill_params.h"

#include <string>

#include "../common/workspace.h"

namespace jpa {
namespace {

ffi::Error Invalid(const std::string& msg) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jax_paged_attn: " + msg);
}

DType ToDType(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return DType::kF32;
    case ffi::DataType::F16: return DType::kF16;
    case ffi::DataType::BF16: return DType::kBF16;
    case ffi::DataType::F8E4M3FN: return DType::kF8E4M3;
    default: return DType::kInvalid;
  }
}

int64_t Count(const ffi::AnyBuffer& b) { return static_cast<int64_t>(b.element_count()); }

// Layout 2, "interleaved": one buffer [P, page, 2*Hkv, D] whose combined head 2h is K head h
// and 2h+1 is V head h (the layout of JAX's TPU ragged_paged_attention). Only strides differ
// from NHD: heads are 2*D apart and V starts D elements after K.
ffi::Error FillInterleavedKV(const ffi::AnyBuffer& pages, int64_t combined, PagedKV* kv) {
  auto d = pages.dimensions();
  if (!combined) return Invalid("interleaved pages are combined (one buffer, v_pages None)");
  if (d.size() != 4) return Invalid("interleaved pages must be rank 4 [P, page, 2*Hkv, D]");
  if (d[2] % 2 != 0) return Invalid("interleaved pages need an even number of heads");
  kv->dtype = ToDType(pages.element_type());
  if (kv->dtype == DType::kInvalid) return Invalid("unsupported page dtype");
  const int64_t head_dim = d[3];
  kv->num_pages = d[0];
  kv->page_size = d[1];
  kv->num_heads = d[2] / 2;
  kv->head_stride = 2 * head_dim;
  kv->slot_stride = d[2] * head_dim;
  kv->page_stride = kv->page_size * kv->slot_stride;
  kv->k = pages.untyped_data();
  kv->v = static_cast<char*>(pages.untyped_data()) + head_dim * dtype_bytes(kv->dtype);
  return ffi::Error::Success();
}

// Page geometry from the page buffer's dims and the layout attributes.
ffi::Error FillPagedKV(const ffi::AnyBuffer& k_pages, const ffi::AnyBuffer& v_pages,
                       int64_t layout, int64_t combined, PagedKV* kv) {
  auto d = k_pages.dimensions();
  if (layout == 2) return FillInterleavedKV(k_pages, combined, kv);
  const size_t rank = combined ? 5 : 4;
  if (d.size() != rank) return Invalid("k_pages has the wrong rank");
  if (layout != 0 && layout != 1)
    return Invalid("kv_layout must be 0 (NHD), 1 (HND) or 2 (interleaved)");
  const size_t o = combined ? 2 : 1;  // first dim after [P] (and the K/V axis)
  if (combined && d[1] != 2) return Invalid("combined pages need axis 1 of size 2");
  kv->dtype = ToDType(k_pages.element_type());
  if (kv->dtype == DType::kInvalid) return Invalid("unsupported page dtype");
  kv->num_pages = d[0];
  kv->page_size = layout == 0 ? d[o] : d[o + 1];
  kv->num_heads = layout == 0 ? d[o + 1] : d[o];
  const int64_t head_dim = d[o + 2];
  kv->head_stride = layout == 0 ? head_dim : kv->page_size * head_dim;
  kv->slot_stride = layout == 0 ? kv->num_heads * head_dim : head_dim;
  const int64_t half = kv->page_size * kv->num_heads * head_dim;
  kv->page_stride = combined ? 2 * half : half;
  kv->k = k_pages.untyped_data();
  if (combined) {
    kv->v = static_cast<char*>(k_pages.untyped_data()) + half * dtype_bytes(kv->dtype);
  } else {
    if (v_pages.dimensions().size() != rank || v_pages.element_type() != k_pages.element_type())
      return Invalid("v_pages must match k_pages in shape and dtype");
    for (size_t i = 0; i < rank; ++i)
      if (v_pages.dimensions()[i] != d[i]) return Invalid("v_pages must match k_pages");
    kv->v = v_pages.untyped_data();
  }
  return ffi::Error::Success();
}

// Checks a strided [tokens, heads, head_dim] view against its base buffer and fills `view`.
ffi::Error FillTokenView(const ffi::AnyBuffer& base, int64_t offset,
                         ffi::Span<const int64_t> strides, int64_t tokens, int64_t heads,
                         int64_t head_dim, const char* name, TokenView* view) {
  if (strides.size() != 2) return Invalid(std::string(name) + " strides must have 2 entries");
  if (offset < 0 || strides[0] < 0 || strides[1] < 0)
    return Invalid(std::string(name) + " view offset/strides must be non-negative");
  if (tokens > 0 && heads > 0 && head_dim > 0) {
    // Last element the view reaches, in int64 with overflow checks: absurd strides (say
    // 2^62) must not wrap around to a small value that passes the bound check.
    int64_t a, b, last;
    if (__builtin_mul_overflow(tokens - 1, strides[0], &a) ||
        __builtin_mul_overflow(heads - 1, strides[1], &b) ||
        __builtin_add_overflow(offset, a, &last) || __builtin_add_overflow(last, b, &last) ||
        __builtin_add_overflow(last, head_dim - 1, &last) || last >= Count(base))
      return Invalid(std::string(name) + " view reaches past its base");
  }
  view->dtype = ToDType(base.element_type());
  if (view->dtype == DType::kInvalid) return Invalid(std::string(name) + " has an unsupported dtype");
  view->ptr = static_cast<const char*>(base.untyped_data()) + offset * dtype_bytes(view->dtype);
  view->stride_tok = strides[0];
  view->stride_head = strides[1];
  return ffi::Error::Success();
}

}  // namespace

ffi::Error FillAttentionParams(const AttentionBuffers& b, const AttentionAttrs& a,
                               AttnParams* p) {
  auto od = b.out.dimensions();
  if (od.size() != 3) return Invalid("out must be [tokens, heads, head_dim]");
  p->num_tokens = od[0];
  p->num_q_heads = od[1];
  p->head_dim = od[2];
  if (p->num_q_heads != a.num_q_heads) return Invalid("num_q_heads attribute disagrees with out");
  if (auto e = FillPagedKV(b.k_pages, b.v_pages, a.kv_layout, a.kv_combined, &p->kv);
      e.failure())
    return e;
  const int64_t kd = b.k_pages.dimensions()[b.k_pages.dimensions().size() - 1];
  if (kd != p->head_dim) return Invalid("head_dim of pages and query differ");
  if (p->kv.num_heads <= 0 || p->num_q_heads % p->kv.num_heads != 0)
    return Invalid("num_q_heads must be a multiple of num_kv_heads");
  if (auto e = FillTokenView(b.q, a.q_offset, a.q_strides, p->num_tokens, p->num_q_heads,
                             p->head_dim, "q", &p->q);
      e.failure())
    return e;

  auto bt = b.block_tables.dimensions();
  if (bt.size() != 2) return Invalid("block_tables must be rank 2");
  p->batch = bt[0];
  p->max_pages_per_req = bt[1];
  p->block_tables = b.block_tables.typed_data();
  if (b.seq_lens.dimensions().size() != 1 || b.seq_lens.dimensions()[0] != p->batch)
    return Invalid("seq_lens must be [batch]");
  p->seq_lens = b.seq_lens.typed_data();
  if (b.cu_seqlens_q.has_value()) {
    auto cd = b.cu_seqlens_q->dimensions();
    if (cd.size() != 1 || cd[0] != p->batch + 1) return Invalid("cu_seqlens_q must be [batch+1]");
    p->cu_seqlens_q = b.cu_seqlens_q->typed_data();
    if (a.max_q_len < 1) return Invalid("max_q_len must be >= 1");
    p->max_q_len = a.max_q_len;
    p->causal = a.causal != 0;
  } else {
    // num_tokens == batch * q_len_per_req, checked without forming the product (a huge
    // q_len_per_req attribute must not wrap around to a match).
    const bool rows_match = p->batch == 0 ? p->num_tokens == 0
                                          : p->num_tokens % p->batch == 0 &&
                                                p->num_tokens / p->batch == a.q_len_per_req;
    if (a.q_len_per_req < 1 || !rows_match)
      return Invalid("decode needs num_tokens == batch * q_len_per_req");
    p->q_len_per_req = a.q_len_per_req;
    p->max_q_len = a.q_len_per_req;
    p->causal = true;
  }
  if (b.scales.element_count() != 2) return Invalid("scales must be [2]");
  p->scales = b.scales.typed_data();
  const int64_t ns = static_cast<int64_t>(b.sinks.element_count());
  if (ns != 0 && ns != p->num_q_heads) return Invalid("sinks must be [num_q_heads] or empty");
  p->sinks = ns ? b.sinks.typed_data() : nullptr;
  p->sm_scale = a.sm_scale;
  p->softcap = a.softcap;
  auto is_bit = [](int64_t x) { return x == 0 || x == 1; };
  if (!is_bit(a.launch_family) || !is_bit(a.launch_mixed) || !is_bit(a.launch_longest_first) ||
      !is_bit(a.launch_fused_merge) ||
      (a.launch_tile_rows != 0 && a.launch_tile_rows != 64 && a.launch_tile_rows != 128) ||
      a.launch_splits < 0 || a.launch_splits > ws::kMaxSplits)
    return Invalid("launch switches out of range (launch_options.py writes them)");
  p->launch.force_sm80 = a.launch_family == 1;
  p->launch.mixed_split = a.launch_mixed == 1;
  p->launch.tile_rows = static_cast<int>(a.launch_tile_rows);
  p->launch.longest_first = a.launch_longest_first == 1;
  p->launch.fused_merge = a.launch_fused_merge == 1;
  p->launch.splits = static_cast<int>(a.launch_splits);
  if (a.window_left < -1) return Invalid("window_left must be >= -1");
  p->window_left = a.window_left;

  p->out = b.out.untyped_data();
  p->out_dtype = ToDType(b.out.element_type());
  if (p->out_dtype == DType::kInvalid || p->out_dtype == DType::kF8E4M3)
    return Invalid("unsupported output dtype");
  auto ld = b.lse.dimensions();
  if (ld.size() != 2 || ld[0] != p->num_tokens || ld[1] != p->num_q_heads)
    return Invalid("lse must be [tokens, heads]");
  p->lse = b.lse.typed_data();
  return ffi::Error::Success();
}

ffi::Error FillAppendParams(const AppendBuffers& b, const AppendAttrs& a, AppendParams* p) {
  if (auto e = FillPagedKV(b.k_pages_out, b.v_pages_out, a.kv_layout, a.kv_combined, &p->kv);
      e.failure())
    return e;
  auto pd = b.k_pages_out.dimensions();
  p->head_dim = pd[pd.size() - 1];
  auto sd = b.slot_mapping.dimensions();
  if (sd.size() != 1) return Invalid("slot_mapping must be rank 1");
  p->num_tokens = sd[0];
  p->slot_mapping = b.slot_mapping.typed_data();
  if (auto e = FillTokenView(b.k, a.k_offset, a.k_strides, p->num_tokens, p->kv.num_heads,
                             p->head_dim, "k", &p->k);
      e.failure())
    return e;
  if (auto e = FillTokenView(b.v, a.v_offset, a.v_strides, p->num_tokens, p->kv.num_heads,
                             p->head_dim, "v", &p->v);
      e.failure())
    return e;
  if (b.scales.element_count() != 2) return Invalid("scales must be [2]");
  p->scales = b.scales.typed_data();
  return ffi::Error::Success();
}

}  // namespace jpa
