"""The public entry points: validate at trace time, turn views into (base, offset, strides),
bind the primitives. Everything static is checked here with an error naming the argument."""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from . import _registry, layers, primitives
from .views import StridedView, as_view, page_geometry

_Q_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
_PAGE_DTYPES = _Q_DTYPES + (jnp.dtype(jnp.float8_e4m3fn),)
_LAYOUTS = {"NHD": 0, "HND": 1}


# ----------------------------------------------------------------------------- checks


def _fail(name, msg, exc=ValueError):
    raise exc(f"{name}: {msg}")


def _require_array(x, name):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        _fail(name, f"expected an array, got {type(x).__name__}", TypeError)


def _require_int_array(x, name, rank):
    _require_array(x, name)
    if jnp.dtype(x.dtype) != jnp.dtype(jnp.int32):
        _fail(name, f"expected dtype int32, got {x.dtype}", TypeError)
    if x.ndim != rank:
        _fail(name, f"expected rank {rank}, got shape {tuple(x.shape)}")


def _static_int(x, name, minimum):
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        _fail(name, f"expected a Python int, got {type(x).__name__}", TypeError)
    if x < minimum:
        _fail(name, f"must be >= {minimum}, got {x}")
    return int(x)


def _token_view(x, name, dtypes):
    """A [tokens, heads, head_dim] operand as a checked view."""
    view = as_view(x, name)
    if view.ndim != 3:
        _fail(name, f"expected rank 3 [tokens, heads, head_dim], got shape {view.shape}")
    if jnp.dtype(view.dtype) not in dtypes:
        _fail(name, f"dtype {view.dtype} not supported (expected one of "
                    f"{[str(d) for d in dtypes]})", TypeError)
    return view


_PAGE_DIMS = {"NHD": ["page_size", "Hkv", "D"], "HND": ["Hkv", "page_size", "D"]}


class _Pages:
    """Checked page operands: geometry plus what the primitives need.

    With `layer`, the operands are a stack `[num_layers, <pages>]` that the kernels see as one
    flat pool of num_layers * P pages (layers.py); `block_tables`, `seq_lens` and `slots`
    rewrite the metadata into that pool and `unstack` restores the stacked shape.
    """

    def __init__(self, k_pages, v_pages, kv_layout, layer=None):
        if kv_layout not in _LAYOUTS:
            _fail("kv_layout", f"expected 'NHD' or 'HND', got {kv_layout!r}")
        _require_array(k_pages, "k_pages")
        if isinstance(k_pages, StridedView) or isinstance(v_pages, StridedView):
            _fail("k_pages", "pages must be plain arrays (their strides come from kv_layout)",
                  TypeError)
        if jnp.dtype(k_pages.dtype) not in _PAGE_DTYPES:
            _fail("k_pages", f"dtype {k_pages.dtype} not supported (expected bfloat16, "
                             "float16, float32 or float8_e4m3fn)", TypeError)
        self.combined = v_pages is None
        stacked = layer is not None
        shape = tuple(k_pages.shape)
        dims = ((["num_layers"] if stacked else []) + ["P"] + (["2"] if self.combined else [])
                + _PAGE_DIMS[kv_layout])
        rank = len(dims)
        if len(shape) != rank:
            hint = ""
            if not stacked and len(shape) == rank + 1:
                hint = " (a stacked [num_layers, ...] cache needs layer=)"
            what = "combined pages (v_pages=None)" if self.combined else "pages"
            _fail("k_pages", f"{what} must be rank {rank} [{', '.join(dims)}] ({kv_layout}"
                             f"{', layer given' if stacked else ''}), got shape {shape}{hint}")
        lead = 1 if stacked else 0
        if self.combined and shape[lead + 1] != 2:
            _fail("k_pages", f"combined pages need axis {lead + 1} of size 2 (K, V), got "
                             f"{shape}")
        if not self.combined:
            _require_array(v_pages, "v_pages")
            if tuple(v_pages.shape) != shape:
                _fail("v_pages", f"shape {tuple(v_pages.shape)} differs from k_pages {shape}")
            if v_pages.dtype != k_pages.dtype:
                _fail("v_pages", f"dtype {v_pages.dtype} differs from k_pages {k_pages.dtype}",
                      TypeError)
        self.layout = _LAYOUTS[kv_layout]
        num_pages, self.page_size, self.num_heads, self.head_dim = page_geometry(
            shape[lead:], kv_layout, self.combined)
        if self.page_size < 1 or self.num_heads < 1 or self.head_dim < 1:
            _fail("k_pages", f"page_size, num_kv_heads and head_dim must be >= 1, got {shape}")
        self.shape = shape
        self.stack = None
        if stacked:
            self.stack = layers.LayerStack(layer, shape[0], num_pages, self.page_size)
            # Layer axis merged into the page axis: a bitcast for the default layout, so the
            # custom call reads (and append writes, aliased) the stack itself.
            flat = (shape[0] * shape[1],) + shape[2:]
            k_pages = jnp.reshape(k_pages, flat)
            v_pages = None if self.combined else jnp.reshape(v_pages, flat)
        self.k = k_pages
        # Combined pages: an empty stand-in keeps the custom call's arity fixed.
        self.v = jnp.zeros((0,), k_pages.dtype) if self.combined else v_pages

    def block_tables(self, block_tables):
        return block_tables if self.stack is None else self.stack.block_tables(block_tables)

    def seq_lens(self, seq_lens):
        return seq_lens if self.stack is None else self.stack.seq_lens(seq_lens)

    def slots(self, slot_mapping):
        return slot_mapping if self.stack is None else self.stack.slot_mapping(slot_mapping)

    def unstack(self, pages):
        """An updated pool in the caller's (possibly stacked) shape."""
        return pages if self.stack is None else jnp.reshape(pages, self.shape)


def _scales(k_scale, v_scale):
    vals = []
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s is None:
            s = 1.0
        if isinstance(s, bool) or not (isinstance(s, numbers.Real) or hasattr(s, "dtype")):
            _fail(name, f"expected a number or a float32 scalar, got {type(s).__name__}",
                  TypeError)
        if hasattr(s, "shape"):
            if tuple(s.shape) not in ((), (1,)):
                _fail(name, f"expected a scalar, got shape {tuple(s.shape)}")
            if not jnp.issubdtype(s.dtype, jnp.floating):
                _fail(name, f"expected a floating scalar, got {s.dtype}", TypeError)
            s = jnp.reshape(s, ())
        vals.append(jnp.asarray(s, jnp.float32))
    return jnp.stack(vals)


def _common_attention(q, pages, block_tables, seq_lens, scale, k_scale, v_scale, window_left,
                      logits_soft_cap, sinks, out_dtype):
    qv = _token_view(q, "q", _Q_DTYPES)
    t, hq, d = qv.shape
    if d != pages.head_dim:
        _fail("q", f"head_dim {d} differs from the pages' head_dim {pages.head_dim}")
    if hq % pages.num_heads:
        _fail("q", f"num_q_heads {hq} is not a multiple of num_kv_heads {pages.num_heads}")
    _require_int_array(block_tables, "block_tables", 2)
    _require_int_array(seq_lens, "seq_lens", 1)
    if seq_lens.shape[0] != block_tables.shape[0]:
        _fail("seq_lens", f"length {seq_lens.shape[0]} differs from block_tables' batch "
                          f"{block_tables.shape[0]}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        _fail("scale", f"expected a finite Python number, got {scale!r}", TypeError)
    window_left = _static_int(window_left, "window_left", -1)
    if logits_soft_cap is None:
        softcap = 0.0
    else:
        if isinstance(logits_soft_cap, bool) or not isinstance(logits_soft_cap, numbers.Real):
            _fail("logits_soft_cap", f"expected a number, got {logits_soft_cap!r}", TypeError)
        if not logits_soft_cap > 0 or not math.isfinite(logits_soft_cap):
            _fail("logits_soft_cap", f"must be a positive finite number, got {logits_soft_cap}")
        softcap = float(logits_soft_cap)
    if sinks is None:
        sinks_arr = jnp.zeros((0,), jnp.float32)
    else:
        _require_array(sinks, "sinks")
        if tuple(sinks.shape) != (hq,):
            _fail("sinks", f"expected shape ({hq},) [num_q_heads], got {tuple(sinks.shape)}")
        if not jnp.issubdtype(sinks.dtype, jnp.floating):
            _fail("sinks", f"expected float32, got {sinks.dtype}", TypeError)
        sinks_arr = jnp.asarray(sinks, jnp.float32)
    if out_dtype is None:
        out_dtype = qv.dtype
    try:
        out_dtype = jnp.dtype(out_dtype)
    except TypeError:
        _fail("out_dtype", f"not a dtype: {out_dtype!r}", TypeError)
    if out_dtype not in _Q_DTYPES:
        _fail("out_dtype", f"{out_dtype} not supported (bfloat16, float16 or float32)",
              TypeError)
    params = dict(q_shape=(t, hq, d), q_offset=qv.offset, q_strides=qv.strides[:2],
                  kv_layout=pages.layout, kv_combined=bool(pages.combined),
                  sm_scale=float(scale), softcap=softcap, window_left=window_left,
                  out_dtype=np.dtype(out_dtype))
    meta = (pages.block_tables(block_tables), pages.seq_lens(seq_lens))
    return qv, sinks_arr, params, meta


def _finish(out, lse, return_lse):
    # XLA's dynamic-slice fusion pass clones a custom call whose result is written into a
    # slice of a bigger array (a scan's stacked outputs, say) and keeps the original for the
    # result's other users: the kernel then runs twice. Measured on jax 0.11.2 / H100 (a
    # 32-layer decode scan: 2 attention kernels per layer). The barrier keeps it whole and
    # costs nothing at run time.
    out, lse = jax.lax.optimization_barrier((out, lse))
    return (out, lse) if return_lse else out


def _check_bool(x, name):
    if not isinstance(x, (bool, np.bool_)):
        _fail(name, f"expected a bool, got {type(x).__name__}", TypeError)
    return bool(x)


# ----------------------------------------------------------------------------- public API


def paged_decode(q, k_pages, v_pages, block_tables, seq_lens, *, kv_layout="NHD", scale=None,
                 k_scale=None, v_scale=None, window_left=-1, logits_soft_cap=None, sinks=None,
                 q_len_per_req=1, return_lse=False, out_dtype=None, layer=None):
    """Decode attention over a paged KV cache (see DESIGN.md §3 and docs/semantics.md).

    Request b owns query rows [b*n, (b+1)*n), n = q_len_per_req, bottom-right aligned to its
    seq_lens[b] keys, causal. Returns out [T, Hq, D] (and lse [T, Hq] with return_lse).

    `layer`: with a stacked cache `[num_layers, <pages>]`, the layer to attend to (a Python
    int, or an integer scalar array that may be traced, e.g. a scan's layer counter); the
    block tables index that layer's pages. Nothing is copied out of the stack; a runtime layer
    outside [0, num_layers) gives NaN in every request's rows (docs/semantics.md).
    """
    _registry.register()
    return_lse = _check_bool(return_lse, "return_lse")
    pages = _Pages(k_pages, v_pages, kv_layout, layer)
    qv, sinks_arr, params, (bt, sl) = _common_attention(
        q, pages, block_tables, seq_lens, scale, k_scale, v_scale, window_left,
        logits_soft_cap, sinks, out_dtype)
    n = _static_int(q_len_per_req, "q_len_per_req", 1)
    b = block_tables.shape[0]
    if qv.shape[0] != b * n:
        _fail("q_len_per_req", f"q has {qv.shape[0]} tokens but batch {b} x q_len_per_req {n}"
                               f" = {b * n}")
    out, lse = primitives.decode_p.bind(
        qv.base, pages.k, pages.v, bt, sl, _scales(k_scale, v_scale),
        sinks_arr, q_len_per_req=n, causal=True, max_q_len=n, **params)
    return _finish(out, lse, return_lse)


def paged_prefill(q, k_pages, v_pages, block_tables, seq_lens, cu_seqlens_q, *, max_q_len,
                  causal=True, kv_layout="NHD", scale=None, k_scale=None, v_scale=None,
                  window_left=-1, logits_soft_cap=None, sinks=None, return_lse=False,
                  out_dtype=None, layer=None):
    """Prefill (ragged, chunked) attention over a paged KV cache.

    Request b owns query rows [cu_seqlens_q[b], cu_seqlens_q[b+1]), bottom-right aligned to
    its seq_lens[b] keys; `max_q_len` is a static bound on any request's query length.
    `layer`: as in `paged_decode` (a stacked cache and the layer to attend to).
    """
    _registry.register()
    return_lse = _check_bool(return_lse, "return_lse")
    causal = _check_bool(causal, "causal")
    pages = _Pages(k_pages, v_pages, kv_layout, layer)
    qv, sinks_arr, params, (bt, sl) = _common_attention(
        q, pages, block_tables, seq_lens, scale, k_scale, v_scale, window_left,
        logits_soft_cap, sinks, out_dtype)
    _require_int_array(cu_seqlens_q, "cu_seqlens_q", 1)
    if cu_seqlens_q.shape[0] != block_tables.shape[0] + 1:
        _fail("cu_seqlens_q", f"expected length batch+1 = {block_tables.shape[0] + 1}, got "
                              f"{cu_seqlens_q.shape[0]}")
    max_q_len = _static_int(max_q_len, "max_q_len", 1)
    out, lse = primitives.prefill_p.bind(
        qv.base, pages.k, pages.v, bt, sl, cu_seqlens_q,
        _scales(k_scale, v_scale), sinks_arr, q_len_per_req=1, causal=causal,
        max_q_len=max_q_len, **params)
    return _finish(out, lse, return_lse)


def append_kv(k_pages, v_pages, k, v, slot_mapping, *, kv_layout="NHD", k_scale=None,
              v_scale=None, layer=None):
    """Writes new tokens' K/V into their page slots; returns the updated (k_pages, v_pages)
    ((kv_pages, None) for combined pages). In place when the caller donates the cache.

    `layer`: with a stacked cache `[num_layers, <pages>]`, the layer to write (a Python int or
    a possibly traced integer scalar); slots index that layer's pages, the other layers are
    untouched and the result keeps the stacked shape. A runtime layer outside
    [0, num_layers) skips every token.
    """
    _registry.register()
    pages = _Pages(k_pages, v_pages, kv_layout, layer)
    kv = _token_view(k, "k", _Q_DTYPES)
    vv = _token_view(v, "v", _Q_DTYPES)
    if kv.shape != vv.shape:
        _fail("v", f"shape {vv.shape} differs from k's {kv.shape}")
    t, hkv, d = kv.shape
    if hkv != pages.num_heads:
        _fail("k", f"has {hkv} heads but the pages hold {pages.num_heads} KV heads")
    if d != pages.head_dim:
        _fail("k", f"head_dim {d} differs from the pages' head_dim {pages.head_dim}")
    _require_int_array(slot_mapping, "slot_mapping", 1)
    if slot_mapping.shape[0] != t:
        _fail("slot_mapping", f"length {slot_mapping.shape[0]} differs from the {t} tokens "
                              "of k/v")
    k_out, v_out = primitives.append_p.bind(
        pages.k, pages.v, kv.base, vv.base, pages.slots(slot_mapping),
        _scales(k_scale, v_scale), k_offset=kv.offset, k_strides=kv.strides[:2],
        v_offset=vv.offset, v_strides=vv.strides[:2], kv_layout=pages.layout,
        kv_combined=bool(pages.combined), layouts_on_operands=pages.stack is not None)
    if pages.combined:
        return pages.unstack(k_out), None
    return pages.unstack(k_out), pages.unstack(v_out)
