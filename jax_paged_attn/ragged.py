"""`ragged_paged_attention`: the signature and semantics of JAX's Pallas TPU kernel
(`jax.experimental.pallas.ops.tpu.ragged_paged_attention`), on our kernels.

JAX serving code (vLLM's TPU backend, SGLang-JAX, MaxText) calls that kernel with K and V
interleaved in one page array `[P, page, 2*Hkv, D]`. Here those pages reach `paged_prefill`
as the "interleaved" layout: K head h is combined head 2h and V head h is 2h+1, told to the
kernel by strides, so nothing is copied or split. Differences of semantics from the TPU
kernel are listed in docs/serving.md.
"""

from __future__ import annotations

import numbers

import jax.numpy as jnp

from . import api, checks


def _optional_float(x, name, positive=False):
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        checks.fail(name, f"expected a Python number or None, got {x!r}", TypeError)
    if positive and not x > 0:
        checks.fail(name, f"must be positive, got {x}")
    return float(x)


def active_sequences(kv_lens, cu_q_lens, num_seqs):
    """(seq_lens, cu_seqlens_q) in which sequences at or past the runtime `num_seqs` own no
    query rows and no keys: their rows read nothing and come back as zeros."""
    count = kv_lens.shape[0]
    n = jnp.clip(jnp.reshape(num_seqs, (-1,))[0].astype(jnp.int32), 0, count)
    active = jnp.arange(count, dtype=jnp.int32) < n
    seq_lens = jnp.where(active, kv_lens, 0)
    end = cu_q_lens[n]
    cu = jnp.where(jnp.arange(count + 1, dtype=jnp.int32) <= n, cu_q_lens, end)
    return seq_lens, cu


def ragged_paged_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                           sm_scale=1.0, sliding_window=None, soft_cap=None, mask_value=None,
                           k_scale=None, v_scale=None, max_q_len=None, layer=None):
    """Ragged (mixed prefill and decode) paged attention, a drop-in for the Pallas TPU kernel.

    Args:
      q: `[T, Hq, D]` queries of every sequence, packed (bfloat16 / float16; float32 on
        the CPU); an array or a `StridedView`.
      kv_pages: `[P, page_size, 2*Hkv, D]`, K head h at combined head 2h, V head h at 2h+1
        (bfloat16 / float16 / float8_e4m3fn; float32 on the CPU). With `layer`, a stack
        `[num_layers, P, page_size, 2*Hkv, D]`.
      kv_lens: int32 `[S]`, each sequence's KV length including its new tokens.
      page_indices: int32 `[S, pages_per_seq]`, each sequence's pages in key order.
      cu_q_lens: int32 `[S+1]`; sequence s owns query rows `[cu_q_lens[s], cu_q_lens[s+1])`.
      num_seqs: int32 `[1]`, a runtime value: sequences at or past it own no rows, are never
        read, and rows after `cu_q_lens[num_seqs]` are zeros.
      sm_scale: static float, logits scale (default 1.0, as the TPU kernel; not 1/sqrt(D)).
      sliding_window: static int >= 1 or None: a query at position p sees keys j with
        `p - j < sliding_window`.
      soft_cap: static positive float or None: logits become `soft_cap * tanh(s / soft_cap)`.
      mask_value: accepted for compatibility. Masked logits are excluded from the softmax
        exactly here (the TPU kernel adds `mask_value`, default -0.7 * float32 max, which
        is the same whenever a row sees at least one key; valid metadata ensures it does).
      k_scale, v_scale: static floats or None: K and V as read are `stored * scale`.
      max_q_len: static bound on any sequence's query length (an extension: it sizes the
        GPU grid, default `T`; pass the real bound for mixed batches of mostly decode rows).
      layer: as in `paged_prefill` (an extension): the layer of a stacked cache.

    Returns:
      `[T, Hq, D]` in q's dtype. Invalid metadata gives NaN rows in that sequence, as
      `paged_prefill` does (the TPU kernel leaves it undefined).
    """
    checks.require_int_array(kv_lens, "kv_lens", 1)
    checks.require_int_array(page_indices, "page_indices", 2)
    checks.require_int_array(cu_q_lens, "cu_q_lens", 1)
    checks.require_array(num_seqs, "num_seqs")
    if tuple(num_seqs.shape) != (1,) or not jnp.issubdtype(num_seqs.dtype, jnp.integer):
        checks.fail("num_seqs", f"expected an int32 array of shape (1,), got "
                                f"{num_seqs.dtype}{tuple(num_seqs.shape)}", TypeError)
    if sliding_window is not None:
        sliding_window = checks.static_int(sliding_window, "sliding_window", 1)
    _optional_float(mask_value, "mask_value")
    soft_cap = _optional_float(soft_cap, "soft_cap", positive=True)
    num_tokens = int(q.shape[0])
    if max_q_len is None:
        max_q_len = max(num_tokens, 1)
    seq_lens, cu = active_sequences(kv_lens, cu_q_lens, num_seqs)
    return api.paged_prefill(
        q, kv_pages, None, page_indices, seq_lens, cu, max_q_len=max_q_len, causal=True,
        kv_layout="interleaved", scale=sm_scale,
        k_scale=_optional_float(k_scale, "k_scale"), v_scale=_optional_float(v_scale, "v_scale"),
        window_left=-1 if sliding_window is None else sliding_window - 1,
        logits_soft_cap=soft_cap, layer=layer)


def ragged_append_kv(kv_pages, k, v, slot_mapping, *, k_scale=None, v_scale=None, layer=None):
    """Writes new tokens' K (`[T, Hkv, D]`) and V into interleaved pages `[P, page, 2*Hkv, D]`
    (K head h at combined head 2h, V at 2h+1) at `slot_mapping` (int32 `[T]`, slot = page *
    page_size + offset, negative skips). Returns the updated pages; in place under
    donation. Same options as `append_kv`."""
    out, _ = api.append_kv(kv_pages, None, k, v, slot_mapping, kv_layout="interleaved",
                           k_scale=k_scale, v_scale=v_scale, layer=layer)
    return out
