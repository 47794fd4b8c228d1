"""The public entry points: validate at trace time, turn views into (base, offset, strides),
bind the primitives. Every static check lives in checks.py / pages.py (shared with the
reference), with an error naming the argument."""

from __future__ import annotations

import jax

from . import _registry, checks, primitives
from . import pages as pages_mod


def _finish(out, lse, return_lse):
    # XLA's dynamic-slice fusion pass clones a custom call whose result is written into a
    # slice of a bigger array (a scan's stacked outputs, say) and keeps the original for the
    # result's other users: the kernel then runs twice. Measured on jax 0.11.2 / H100 (a
    # 32-layer decode scan: 2 attention kernels per layer). The barrier keeps it whole and
    # costs nothing at run time.
    out, lse = jax.lax.optimization_barrier((out, lse))
    return (out, lse) if return_lse else out


def _kernel_params(qv, pages, opts):
    """Static parameters of the attention primitives from the checked operands."""
    t, hq, d = qv.shape
    return dict(q_shape=(t, hq, d), q_offset=qv.offset, q_strides=qv.strides[:2],
                kv_layout=pages.layout, kv_combined=bool(pages.combined),
                sm_scale=opts.scale, softcap=opts.softcap, window_left=opts.window_left,
                out_dtype=opts.out_dtype)


def _sinks_operand(opts):
    # No sinks: an empty operand keeps the custom call's arity fixed.
    return jax.numpy.zeros((0,), jax.numpy.float32) if opts.sinks is None else opts.sinks


# ----------------------------------------------------------------------------- public API

_ATTENTION_ARGS = """
    Args:
      q: queries `[T, Hq, D]`, bfloat16 / float16 (float32 on the CPU), an array or a
        `StridedView` (e.g. from `split_qkv`: no copy is made).
      k_pages, v_pages: the paged cache, one dtype, bfloat16 / float16 / float8_e4m3fn
        (float32 on the CPU). `kv_layout="NHD"`: `[P, page_size, Hkv, D]`; `"HND"`:
        `[P, Hkv, page_size, D]`. Combined pages: `k_pages` `[P, 2, ...]` (K at 0, V at 1)
        and `v_pages=None`. With `layer`, a stack `[num_layers, <that shape>]`.
      block_tables: int32 `[B, max_pages]`; key j of request b is on page
        `block_tables[b, j // page_size]`, slot `j % page_size`.
      seq_lens: int32 `[B]`, each request's KV length including the tokens being processed.
      kv_layout: static, "NHD" or "HND".
      scale: static Python float, logits scale (default `1/sqrt(D)`).
      k_scale, v_scale: Python floats or float32 scalars (may be traced): K and V as read
        are `stored * scale`, for every page dtype (default 1.0).
      window_left: static int; `w >= 0` shows key j only when `pos - j <= w`; -1: no window.
      logits_soft_cap: static positive float or None: logits become `cap * tanh(s / cap)`.
      sinks: float32 `[Hq]` or None: one extra logit per head in the softmax denominator.
      return_lse: static bool; also return the float32 `[T, Hq]` log-sum-exp (natural
        log of the denominator, sink included).
      out_dtype: output dtype (bfloat16 / float16 / float32), default q's dtype.
      layer: None, or with a stacked cache the layer to attend to (a Python int, or an
        integer scalar array that may be traced, e.g. a scan's layer counter). Nothing is
        copied out of the stack; a runtime layer outside `[0, num_layers)` gives NaN rows.
"""

_ATTENTION_RETURNS = """
    Returns:
      out `[T, Hq, D]` in `out_dtype`, or `(out, lse)` with `return_lse=True`. Query head h
      reads KV head `h // (Hq // Hkv)`. Rows owned by no request: 0 (lse -inf). Invalid
      runtime metadata (docs/semantics.md): NaN in that request's rows only.

    Raises:
      ValueError / TypeError at trace time, naming the argument, for static misuse (see
      docs/api.md); `check_metadata` checks runtime metadata.
"""


def paged_decode(q, k_pages, v_pages, block_tables, seq_lens, *, kv_layout="NHD", scale=None,
                 k_scale=None, v_scale=None, window_left=-1, logits_soft_cap=None, sinks=None,
                 q_len_per_req=1, return_lse=False, out_dtype=None, layer=None):
    """Decode attention over a paged KV cache (docs/api.md, docs/semantics.md).

    Request b owns query rows `[b*n, (b+1)*n)`, `n = q_len_per_req` (static int >= 1; > 1
    for speculative decoding), so `T == B * n`; token i of request b sits at position
    `seq_lens[b] - n + i` and sees keys up to it (always causal).
    """
    _registry.register()
    return_lse = checks.check_bool(return_lse, "return_lse")
    pages = pages_mod.PagePool(k_pages, v_pages, kv_layout, layer)
    qv, opts = checks.attention_options(q, pages, block_tables, seq_lens, scale, window_left,
                                        logits_soft_cap, sinks, out_dtype)
    n = checks.decode_queries(qv, block_tables, q_len_per_req)
    out, lse = primitives.decode_p.bind(
        qv.base, pages.k, pages.v, pages.block_tables(block_tables), pages.seq_lens(seq_lens),
        checks.scales(k_scale, v_scale), _sinks_operand(opts), q_len_per_req=n, causal=True,
        max_q_len=n, **_kernel_params(qv, pages, opts))
    return _finish(out, lse, return_lse)


def paged_prefill(q, k_pages, v_pages, block_tables, seq_lens, cu_seqlens_q, *, max_q_len,
                  causal=True, kv_layout="NHD", scale=None, k_scale=None, v_scale=None,
                  window_left=-1, logits_soft_cap=None, sinks=None, return_lse=False,
                  out_dtype=None, layer=None):
    """Prefill / chunked-prefill attention over a paged KV cache, on a ragged batch.

    cu_seqlens_q: int32 `[B+1]`; request b owns query rows `[cu[b], cu[b+1])` (rows outside
    every request are padding), bottom-right aligned to its `seq_lens[b]` keys.
    max_q_len: static int >= 1, an upper bound on every request's query length.
    causal: static bool (default True); False lets every row see all of its request's keys
    (the window still applies).
    """
    _registry.register()
    return_lse = checks.check_bool(return_lse, "return_lse")
    causal = checks.check_bool(causal, "causal")
    pages = pages_mod.PagePool(k_pages, v_pages, kv_layout, layer)
    qv, opts = checks.attention_options(q, pages, block_tables, seq_lens, scale, window_left,
                                        logits_soft_cap, sinks, out_dtype)
    max_q_len = checks.prefill_queries(block_tables, cu_seqlens_q, max_q_len)
    out, lse = primitives.prefill_p.bind(
        qv.base, pages.k, pages.v, pages.block_tables(block_tables), pages.seq_lens(seq_lens),
        cu_seqlens_q, checks.scales(k_scale, v_scale), _sinks_operand(opts), q_len_per_req=1,
        causal=causal, max_q_len=max_q_len, **_kernel_params(qv, pages, opts))
    return _finish(out, lse, return_lse)


paged_decode.__doc__ += _ATTENTION_ARGS + _ATTENTION_RETURNS
paged_prefill.__doc__ += _ATTENTION_ARGS + _ATTENTION_RETURNS


def append_kv(k_pages, v_pages, k, v, slot_mapping, *, kv_layout="NHD", k_scale=None,
              v_scale=None, layer=None):
    """Writes new tokens' K/V into their page slots.

    Args:
      k_pages, v_pages: the cache, as in `paged_decode` (combined pages: `v_pages=None`).
      k, v: `[T, Hkv, D]` bfloat16 / float16 / float32, arrays or views (`split_qkv`).
      slot_mapping: int32 `[T]`, `slot = page * page_size + offset`; a negative slot or one
        `>= P * page_size` skips that token.
      kv_layout: static, "NHD" or "HND".
      k_scale, v_scale: numbers or float32 scalars (may be traced): stored values are
        `k / k_scale`, `v / v_scale`, rounded to nearest even (fp8: saturated to +-448).
      layer: with a stacked cache, the layer to write (int or traced integer scalar); other
        layers are untouched; a runtime layer outside `[0, num_layers)` skips every token.

    Returns:
      `(k_pages, v_pages)` updated (same shapes), or `(kv_pages, None)` for combined pages.
      In place when the caller donates the cache to the jitted function.
    """
    _registry.register()
    pages = pages_mod.PagePool(k_pages, v_pages, kv_layout, layer)
    kv, vv = checks.append_tokens(pages, k, v, slot_mapping)
    k_out, v_out = primitives.append_p.bind(
        pages.k, pages.v, kv.base, vv.base, pages.slots(slot_mapping),
        checks.scales(k_scale, v_scale), k_offset=kv.offset, k_strides=kv.strides[:2],
        v_offset=vv.offset, v_strides=vv.strides[:2], kv_layout=pages.layout,
        kv_combined=bool(pages.combined), layouts_on_operands=pages.stack is not None)
    if pages.combined:
        return pages.unstack(k_out), None
    return pages.unstack(k_out), pages.unstack(v_out)
