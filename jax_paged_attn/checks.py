"""Trace-time checks of the ops' arguments, shared by the public API and the reference so
that both refuse the same misuse with the same message: each error names the argument and
says what was expected (ValueError for shapes and values, TypeError for types and dtypes)."""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax.numpy as jnp
import numpy as np

from .views import as_view

# The ops take q (and new K/V) in these dtypes, pages also in fp8 (the CPU path all of them;
# the CUDA lowering narrows this further, primitives.py).
Q_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
PAGE_DTYPES = Q_DTYPES + (jnp.dtype(jnp.float8_e4m3fn),)


def fail(name, msg, exc=ValueError):
    raise exc(f"{name}: {msg}")


def require_array(x, name):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        fail(name, f"expected an array, got {type(x).__name__}", TypeError)


def require_int_array(x, name, rank):
    require_array(x, name)
    if jnp.dtype(x.dtype) != jnp.dtype(jnp.int32):
        fail(name, f"expected dtype int32, got {x.dtype}", TypeError)
    if x.ndim != rank:
        fail(name, f"expected rank {rank}, got shape {tuple(x.shape)}")


def static_int(x, name, minimum):
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        fail(name, f"expected a Python int, got {type(x).__name__}", TypeError)
    if x < minimum:
        fail(name, f"must be >= {minimum}, got {x}")
    return int(x)


def token_view(x, name, dtypes):
    """A [tokens, heads, head_dim] operand as a checked view."""
    view = as_view(x, name)
    if view.ndim != 3:
        fail(name, f"expected rank 3 [tokens, heads, head_dim], got shape {view.shape}")
    if jnp.dtype(view.dtype) not in dtypes:
        fail(name, f"dtype {view.dtype} not supported (expected one of "
                    f"{[str(d) for d in dtypes]})", TypeError)
    return view


def scales(k_scale, v_scale):
    vals = []
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s is None:
            s = 1.0
        if isinstance(s, bool) or not (isinstance(s, numbers.Real) or hasattr(s, "dtype")):
            fail(name, f"expected a number or a float32 scalar, got {type(s).__name__}",
                  TypeError)
        if hasattr(s, "shape"):
            if tuple(s.shape) not in ((), (1,)):
                fail(name, f"expected a scalar, got shape {tuple(s.shape)}")
            if not jnp.issubdtype(s.dtype, jnp.floating):
                fail(name, f"expected a floating scalar, got {s.dtype}", TypeError)
            s = jnp.reshape(s, ())
        vals.append(jnp.asarray(s, jnp.float32))
    return jnp.stack(vals)


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """The checked, normalized options of a decode / prefill call."""

    scale: float            # logits scale (default 1/sqrt(D) filled in)
    softcap: float          # 0.0: no soft cap
    window_left: int        # -1: no window
    sinks: object           # float32 [Hq] array, or None
    out_dtype: np.dtype


def attention_options(q, pages, block_tables, seq_lens, scale, window_left, logits_soft_cap,
                      sinks, out_dtype):
    """Checks q against the (checked) pages and the shared options; returns (q view, opts)."""
    qv = token_view(q, "q", Q_DTYPES)
    t, hq, d = qv.shape
    if d != pages.head_dim:
        fail("q", f"head_dim {d} differs from the pages' head_dim {pages.head_dim}")
    if hq % pages.num_heads:
        fail("q", f"num_q_heads {hq} is not a multiple of num_kv_heads {pages.num_heads}")
    require_int_array(block_tables, "block_tables", 2)
    require_int_array(seq_lens, "seq_lens", 1)
    if seq_lens.shape[0] != block_tables.shape[0]:
        fail("seq_lens", f"length {seq_lens.shape[0]} differs from block_tables' batch "
                         f"{block_tables.shape[0]}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        fail("scale", f"expected a finite Python number, got {scale!r}", TypeError)
    window_left = static_int(window_left, "window_left", -1)
    if logits_soft_cap is None:
        softcap = 0.0
    else:
        if isinstance(logits_soft_cap, bool) or not isinstance(logits_soft_cap, numbers.Real):
            fail("logits_soft_cap", f"expected a number, got {logits_soft_cap!r}", TypeError)
        if not logits_soft_cap > 0 or not math.isfinite(logits_soft_cap):
            fail("logits_soft_cap", f"must be a positive finite number, got {logits_soft_cap}")
        softcap = float(logits_soft_cap)
    if sinks is not None:
        require_array(sinks, "sinks")
        if tuple(sinks.shape) != (hq,):
            fail("sinks", f"expected shape ({hq},) [num_q_heads], got {tuple(sinks.shape)}")
        if not jnp.issubdtype(sinks.dtype, jnp.floating):
            fail("sinks", f"expected float32, got {sinks.dtype}", TypeError)
        sinks = jnp.asarray(sinks, jnp.float32)
    if out_dtype is None:
        out_dtype = qv.dtype
    try:
        out_dtype = jnp.dtype(out_dtype)
    except TypeError:
        fail("out_dtype", f"not a dtype: {out_dtype!r}", TypeError)
    if out_dtype not in Q_DTYPES:
        fail("out_dtype", f"{out_dtype} not supported (bfloat16, float16 or float32)",
             TypeError)
    return qv, AttentionOptions(float(scale), softcap, window_left, sinks, np.dtype(out_dtype))


def decode_queries(qv, block_tables, q_len_per_req):
    """q_len_per_req checked against q's tokens: T == B * n. Returns n."""
    n = static_int(q_len_per_req, "q_len_per_req", 1)
    b = block_tables.shape[0]
    if qv.shape[0] != b * n:
        fail("q_len_per_req", f"q has {qv.shape[0]} tokens but batch {b} x q_len_per_req {n}"
                              f" = {b * n}")
    return n


def prefill_queries(block_tables, cu_seqlens_q, max_q_len):
    """cu_seqlens_q [B+1] int32 and the static max_q_len. Returns max_q_len."""
    require_int_array(cu_seqlens_q, "cu_seqlens_q", 1)
    if cu_seqlens_q.shape[0] != block_tables.shape[0] + 1:
        fail("cu_seqlens_q", f"expected length batch+1 = {block_tables.shape[0] + 1}, got "
                             f"{cu_seqlens_q.shape[0]}")
    return static_int(max_q_len, "max_q_len", 1)


def append_tokens(pages, k, v, slot_mapping):
    """New K/V ([T, Hkv, D] arrays or views) and their slots, checked against the pages.
    Returns the (k, v) views."""
    kv = token_view(k, "k", Q_DTYPES)
    vv = token_view(v, "v", Q_DTYPES)
    if kv.shape != vv.shape:
        fail("v", f"shape {vv.shape} differs from k's {kv.shape}")
    t, hkv, d = kv.shape
    if hkv != pages.num_heads:
        fail("k", f"has {hkv} heads but the pages hold {pages.num_heads} KV heads")
    if d != pages.head_dim:
        fail("k", f"head_dim {d} differs from the pages' head_dim {pages.head_dim}")
    require_int_array(slot_mapping, "slot_mapping", 1)
    if slot_mapping.shape[0] != t:
        fail("slot_mapping", f"length {slot_mapping.shape[0]} differs from the {t} tokens "
                             "of k/v")
    return kv, vv


def check_bool(x, name):
    if not isinstance(x, (bool, np.bool_)):
        fail(name, f"expected a bool, got {type(x).__name__}", TypeError)
    return bool(x)
