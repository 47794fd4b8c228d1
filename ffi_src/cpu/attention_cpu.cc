// Paged attention on the CPU: decode and prefill share this kernel (decode is prefill with
// q_len_per_req rows per request and causal masking).
#include <cmath>
#include <limits>
#include <vector>

#include "../common/index.h"
#include "../common/mask.h"
#include "../common/request.h"
#include "cpu_kernels.h"

namespace jpa {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

void FillRows(const AttnParams& p, int64_t row_begin, int64_t rows, float out_value,
              float lse_value) {
  for (int64_t t = row_begin; t < row_begin + rows; ++t) {
    for (int64_t h = 0; h < p.num_q_heads; ++h) {
      const int64_t o = out_elem(p, t, h);
      for (int64_t d = 0; d < p.head_dim; ++d) store_from_float(p.out, o + d, p.out_dtype, out_value);
      p.lse[t * p.num_q_heads + h] = lse_value;
    }
  }
}

// One query row (token t, head h) at position pos of request b with kv_len keys.
void AttendRow(const AttnParams& p, int64_t b, int64_t t, int64_t h, int64_t pos, int64_t kv_len,
               std::vector<float>& q, std::vector<float>& logits, std::vector<float>& acc) {
  const int64_t D = p.head_dim;
  const int64_t kvh = h / p.group_size();
  const float k_scale = p.scales[0];
  const float v_scale = p.scales[1];
  const int64_t qo = token_elem(p.q, t, h);
  for (int64_t d = 0; d < D; ++d) q[d] = load_as_float(p.q.ptr, qo + d, p.q.dtype);

  int64_t lo, hi;
  visible_range(pos, kv_len, p.causal, p.window_left, &lo, &hi);
  const int32_t* bt_row = p.block_tables + b * p.max_pages_per_req;
  // No visible key: the row keeps the 0 / -inf written up front (even with a sink).
  if (hi <= lo) return;
  float m = p.sinks ? p.sinks[h] : kNegInf;
  for (int64_t j = lo; j < hi; ++j) {
    const int64_t ko = key_row_elem(p.kv, bt_row, j, -1, kvh);  // pages checked up front
    float s = 0.0f;
    for (int64_t d = 0; d < D; ++d) s += q[d] * load_as_float(p.kv.k, ko + d, p.kv.dtype);
    s = apply_softcap(s * k_scale * p.sm_scale, p.softcap);
    logits[j - lo] = s;
    m = s > m ? s : m;
  }
  float den = p.sinks ? std::exp(p.sinks[h] - m) : 0.0f;
  for (int64_t d = 0; d < D; ++d) acc[d] = 0.0f;
  for (int64_t j = lo; j < hi; ++j) {
    const float w = std::exp(logits[j - lo] - m);
    den += w;
    const int64_t vo = key_row_elem(p.kv, bt_row, j, -1, kvh);
    for (int64_t d = 0; d < D; ++d) acc[d] += w * load_as_float(p.kv.v, vo + d, p.kv.dtype);
  }
  const int64_t o = out_elem(p, t, h);
  const float inv = v_scale / den;
  for (int64_t d = 0; d < D; ++d) store_from_float(p.out, o + d, p.out_dtype, acc[d] * inv);
  p.lse[t * p.num_q_heads + h] = m + std::log(den);
}

}  // namespace

void RunAttentionCpu(const AttnParams& p) {
  // Rows owned by no request (prefill padding) stay 0 / -inf.
  FillRows(p, 0, p.num_tokens, 0.0f, kNegInf);
  std::vector<float> q(p.head_dim), acc(p.head_dim), logits;
  for (int64_t b = 0; b < p.batch; ++b) {
    const RequestInfo r = request_info(p, b);
    if (r.q_len <= 0) continue;
    const bool ok = r.valid && pages_valid(p, b, first_needed_key(r.kv_len, r.q_len, p.window_left),
                                           r.kv_len);
    if (!ok) {
      FillRows(p, r.row_begin, r.q_len, kNaN, kNaN);
      continue;
    }
    logits.resize(static_cast<size_t>(r.kv_len > 0 ? r.kv_len : 1));
    for (int64_t i = 0; i < r.q_len; ++i) {
      const int64_t t = r.row_begin + i;
      const int64_t pos = r.kv_len - r.q_len + i;
      for (int64_t h = 0; h < p.num_q_heads; ++h) AttendRow(p, b, t, h, pos, r.kv_len, q, logits, acc);
    }
  }
}

}  // namespace jpa
