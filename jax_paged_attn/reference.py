"""Pure-`jnp` reference for paged attention: the oracle every test compares against.

It implements docs/semantics.md word for word and never imports the compiled extension, the
primitives or the public api module. Everything is jittable: layout, mask and size options
are static, every metadata array may be traced, and no value is read back to the host.

Memory stays bounded at serving sizes (B=256 x L=1k decode, 1 x 8k prefill, Hq=32, D=128):
work is done one group of requests at a time (a `lax.scan` that scatters each group's rows
into the output), and within a request one chunk of query rows at a time, so no
`[T, Hq, B, L]`-style tensor is ever built. Only the pages a request references are gathered
and upcast, never the whole cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import checks, pages, views

__all__ = ["paged_decode", "paged_prefill", "append_kv"]

# Rough bytes of working set allowed per step of the request loop. XLA keeps a few
# temporaries around, so the real peak is a small multiple of this.
_STEP_BUDGET_BYTES = 512 << 20

# The oracle must not silently use TF32 (the GPU default for float32 dots).
_HIGHEST = jax.lax.Precision.HIGHEST



# --------------------------------------------------------------------------------------------
# Operand helpers
# --------------------------------------------------------------------------------------------

def _is_float8(dtype) -> bool:
    dtype = jnp.dtype(dtype)
    return dtype.itemsize == 1 and jnp.issubdtype(dtype, jnp.floating)


def _f32_scalar(x, default):
    """A Python number or a (possibly traced) scalar as a float32 scalar array."""
    return jnp.asarray(default if x is None else x, jnp.float32).reshape(())


def _page_geometry(k_pages, v_pages, kv_layout):
    """(num_pages, page_size, num_kv_heads, head_dim) of one (unstacked, already checked)
    layer of the cache."""
    return pages.page_geometry(k_pages.shape, kv_layout, v_pages is None)


def _gather_pages(k_pages, v_pages, page_ids, kv_layout):
    """K and V of the pages `page_ids` ([M], already inside [0, P)) as [M * page_size, Hkv, D]
    in key order, in the stored dtype. Gathering before splitting combined pages avoids
    copying the whole cache."""
    if kv_layout == "interleaved":             # [M, page, 2*Hkv, D]: K even, V odd heads
        both = k_pages[page_ids]
        k, v = both[:, :, 0::2], both[:, :, 1::2]
    elif v_pages is None:
        both = k_pages[page_ids]              # [M, 2, ...]
        k, v = both[:, 0], both[:, 1]
    else:
        k, v = k_pages[page_ids], v_pages[page_ids]
    if kv_layout == "HND":                    # [M, Hkv, page, D] -> [M, page, Hkv, D]
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    m, page_size, hkv, d = k.shape
    return k.reshape(m * page_size, hkv, d), v.reshape(m * page_size, hkv, d)


# --------------------------------------------------------------------------------------------
# Per-request bookkeeping: rows owned, and validity (semantics.md, "Invalid runtime metadata")
# --------------------------------------------------------------------------------------------

def _decode_rows(num_requests, q_len_per_req):
    """Decode: request b owns rows [b*n, (b+1)*n); rule 1 never applies."""
    n = q_len_per_req
    row_begin = jnp.arange(num_requests, dtype=jnp.int32) * n
    q_len = jnp.full((num_requests,), n, jnp.int32)
    meta_ok = jnp.ones((num_requests,), bool)
    return row_begin, q_len, meta_ok


def _prefill_rows(cu_seqlens_q, num_tokens, max_q_len):
    """Prefill: rows [e[b], e[b+1]) with e = clip(cummax(cu), 0, T), so ranges never overlap
    whatever the metadata; plus rule 1 (malformed cu_seqlens_q or q_len > max_q_len)."""
    cu = cu_seqlens_q.astype(jnp.int32)
    run_max = jax.lax.cummax(cu, axis=0)
    e = jnp.clip(run_max, 0, num_tokens)
    row_begin, q_len = e[:-1], e[1:] - e[:-1]
    start, end = cu[:-1], cu[1:]
    meta_ok = ((start >= 0) & (end >= start) & (start >= run_max[:-1])
               & (end <= num_tokens) & (end - start <= max_q_len))
    return row_begin, q_len, meta_ok


def _first_needed_key(seq_lens, q_len, window_left):
    """Keys before this index are visible to no row of the request (window)."""
    if window_left < 0:
        return jnp.zeros_like(seq_lens)
    return jnp.maximum(seq_lens - q_len - window_left, 0)


def _request_valid(block_tables, seq_lens, q_len, meta_ok, *, page_size, num_pages,
                   window_left):
    """Rules 2 and 3 on top of rule 1 (`meta_ok`): KV length consistent with q length and
    block-table capacity, and every *needed* page index inside [0, P)."""
    capacity = block_tables.shape[1] * page_size
    ok = meta_ok & (seq_lens >= 0) & (seq_lens >= q_len) & (seq_lens <= capacity)
    # Rule 3, only for requests with rows (and only meaningful once rules 1-2 pass; for a
    # request that fails them the answer does not matter).
    lo = _first_needed_key(seq_lens, q_len, window_left)
    first_page = lo // page_size
    last_page = (seq_lens - 1) // page_size           # floor: -1 when seq_len == 0
    idx = jnp.arange(block_tables.shape[1], dtype=jnp.int32)[None, :]
    needed = ((idx >= first_page[:, None]) & (idx <= last_page[:, None])
              & (q_len > 0)[:, None])
    out_of_range = (block_tables < 0) | (block_tables >= num_pages)
    return ok & ~jnp.any(needed & out_of_range, axis=1)


def _invalid_rows(row_begin, q_len, valid, num_tokens):
    """[T] bool: rows owned by an invalid request. Row ranges are sorted and disjoint, so the
    owner of row t is the first request whose range ends after t."""
    ends = row_begin + q_len
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    owner = jnp.searchsorted(ends, t, side="right")
    owner_c = jnp.clip(owner, 0, ends.shape[0] - 1)
    owned = (owner < ends.shape[0]) & (t >= row_begin[owner_c])
    return owned & ~valid[owner_c]


# --------------------------------------------------------------------------------------------
# Attention math for one chunk of rows of one request
# --------------------------------------------------------------------------------------------

def _visible(pos, row_ok, seq_len, num_keys, *, causal, window_left):
    """[R, num_keys] mask: key j visible to the row at position pos (semantics.md)."""
    j = jnp.arange(num_keys, dtype=jnp.int32)[None, :]
    pos = pos[:, None]
    vis = row_ok[:, None] & (j < seq_len)
    if causal:
        vis &= j <= pos
    if window_left >= 0:
        vis &= pos - j <= window_left
    return vis


def _softmax_attend(q, k, v, vis, scale, soft_cap, sinks):
    """q [R, Hq, D], k/v [N, Hkv, D] float32, vis [R, N] -> out [R, Hq, D], lse [R, Hq].

    Query head h reads KV head h // (Hq // Hkv): heads are grouped as [Hkv, group]."""
    r, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    qg = q.reshape(r, hkv, group, d)
    s = jnp.einsum("rhgd,jhd->rhgj", qg, k, precision=_HIGHEST) * scale
    if soft_cap is not None:
        # cap <= 0 means "no cap" (the kernels' convention); where() discards the 0/0.
        s = jnp.where(soft_cap > 0, soft_cap * jnp.tanh(s / soft_cap), s)
    vis4 = vis[:, None, None, :]
    s = jnp.where(vis4, s, -jnp.inf)
    any_vis = jnp.any(vis, axis=-1)[:, None, None]       # [R, 1, 1]
    m = jnp.max(s, axis=-1)                               # -inf on rows with no visible key
    if sinks is not None:
        sink = sinks.astype(jnp.float32).reshape(hkv, group)
        m = jnp.maximum(m, sink)
    m = jnp.where(any_vis, m, 0.0)                        # keep exp() finite on empty rows
    p = jnp.exp(s - m[..., None])                         # masked keys: exp(-inf) = 0
    den = jnp.sum(p, axis=-1)
    if sinks is not None:
        den = den + jnp.exp(sink - m)
    o = jnp.einsum("rhgj,jhd->rhgd", p, v, precision=_HIGHEST)
    o = o / jnp.where(any_vis, den, 1.0)[..., None]
    # A row with no visible key: output 0 and lse -inf, even with a sink.
    o = jnp.where(any_vis[..., None], o, 0.0)
    lse = jnp.where(any_vis, m + jnp.log(den), -jnp.inf)
    return o.reshape(r, hq, d), lse.reshape(r, hq)


# --------------------------------------------------------------------------------------------
# The driver: loop over groups of requests, chunks of rows within each request
# --------------------------------------------------------------------------------------------

def _plan(num_requests, max_rows, num_keys, hq, hkv, d, page_itemsize, budget):
    """Static chunking: rows per chunk R, chunks per request C, requests per step G."""
    logits_bytes_per_row = hq * num_keys * 4 * 4          # s, p, mask, slack
    rows = max(1, min(max_rows, (budget // 2) // max(1, logits_bytes_per_row)))
    chunks = max(1, -(-max_rows // rows))
    per_request = (2 * num_keys * hkv * d * (page_itemsize + 4 + 4)   # gathered + f32 K, V
                   + rows * logits_bytes_per_row
                   + chunks * rows * hq * (d + 1) * 4)                # this request's output
    group = max(1, min(num_requests, budget // max(1, per_request)))
    return rows, chunks, group


@functools.partial(jax.jit, static_argnames=(
    "max_rows", "causal", "kv_layout", "window_left", "q_len_per_req", "out_dtype",
    "budget"))
def _attention(q, k_pages, v_pages, block_tables, seq_lens, cu_seqlens_q, layer_exists, scale,
               k_scale, v_scale, soft_cap, sinks, *, max_rows, causal, kv_layout, window_left,
               q_len_per_req, out_dtype, budget):
    """Shared body of decode (cu_seqlens_q is None) and prefill. Returns (out, lse).
    `layer_exists` (bool scalar) False makes every request invalid (stacked caches)."""
    num_tokens, hq, d = q.shape
    num_pages, page_size, hkv, _ = _page_geometry(k_pages, v_pages, kv_layout)
    num_requests, max_pages = block_tables.shape
    num_keys = max_pages * page_size
    block_tables = block_tables.astype(jnp.int32)
    seq_lens = seq_lens.astype(jnp.int32)

    out = jnp.zeros((num_tokens, hq, d), jnp.float32)          # padding rows: 0
    lse = jnp.full((num_tokens, hq), -jnp.inf, jnp.float32)    # and -inf
    if num_tokens == 0 or num_requests == 0:
        return out.astype(out_dtype), lse

    if cu_seqlens_q is None:
        row_begin, q_len, meta_ok = _decode_rows(num_requests, q_len_per_req)
    else:
        row_begin, q_len, meta_ok = _prefill_rows(cu_seqlens_q, num_tokens, max_rows)
    valid = _request_valid(block_tables, seq_lens, q_len, meta_ok, page_size=page_size,
                           num_pages=num_pages, window_left=window_left) & layer_exists

    rows, chunks, group = _plan(num_requests, max_rows, num_keys, hq, hkv, d,
                                jnp.dtype(k_pages.dtype).itemsize, budget)
    key_idx = jnp.arange(num_keys, dtype=jnp.int32)

    def one_request(k_pages, v_pages, table, seq_len, begin, n, ok):
        # Invalid page indices are clipped so that nothing is ever read out of bounds; such
        # a request is either invalid (its rows become NaN below) or the page is not needed.
        if num_pages > 0:
            k, v = _gather_pages(k_pages, v_pages, jnp.clip(table, 0, num_pages - 1),
                                 kv_layout)
        else:
            k = v = jnp.zeros((num_keys, hkv, d), k_pages.dtype)
        # Zero the values no row may see, so garbage there (even NaN bit patterns) cannot
        # leak through 0 * NaN in the p @ v product. Garbage keys only reach logits that the
        # mask replaces with -inf.
        needed = ((key_idx >= _first_needed_key(seq_len, n, window_left))
                  & (key_idx < seq_len))[:, None, None]
        k = k.astype(jnp.float32) * k_scale
        v = jnp.where(needed, v.astype(jnp.float32) * v_scale, 0.0)

        def chunk(c):
            i = c * rows + jnp.arange(rows, dtype=jnp.int32)   # row index within request
            row_ok = (i < n) & ok
            qc = q[jnp.clip(begin + i, 0, num_tokens - 1)].astype(jnp.float32)
            pos = seq_len - n + i                              # bottom-right aligned
            vis = _visible(pos, row_ok, seq_len, num_keys, causal=causal,
                           window_left=window_left)
            o, l = _softmax_attend(qc, k, v, vis, scale, soft_cap, sinks)
            dest = jnp.where(row_ok, begin + i, num_tokens)    # num_tokens: dropped
            return o, l, dest

        if chunks == 1:
            return chunk(0)
        o, l, dest = jax.lax.map(chunk, jnp.arange(chunks, dtype=jnp.int32))
        return (o.reshape(chunks * rows, hq, d), l.reshape(chunks * rows, hq),
                dest.reshape(chunks * rows))

    # Pad the request axis to a multiple of the group size with empty requests (no rows).
    steps = -(-num_requests // group)
    pad = steps * group - num_requests

    def padded(x):
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape((steps, group) + x.shape[1:])

    xs = tuple(padded(x) for x in (block_tables, seq_lens, row_begin, q_len, valid))

    def step(carry, x):
        out, lse = carry
        # Tie the cache to this step so XLA cannot hoist work on the whole cache out of the
        # loop (XLA:CPU upcasts a bf16/fp8 gather to float32; hoisted, that convert would be
        # a float32 copy of the entire cache).
        kp, vp, _ = jax.lax.optimization_barrier((k_pages, v_pages, x[0]))
        o, l, dest = jax.vmap(one_request, in_axes=(None, None, 0, 0, 0, 0, 0))(kp, vp, *x)
        dest = dest.reshape(-1)
        out = out.at[dest].set(o.reshape(-1, hq, d), mode="drop")
        lse = lse.at[dest].set(l.reshape(-1, hq), mode="drop")
        return (out, lse), None

    (out, lse), _ = jax.lax.scan(step, (out, lse), xs)

    # Invalid metadata: NaN in exactly that request's rows (rows beyond max_q_len included).
    bad = _invalid_rows(row_begin, q_len, valid, num_tokens)
    out = jnp.where(bad[:, None, None], jnp.nan, out)
    lse = jnp.where(bad[:, None], jnp.nan, lse)
    return out.astype(out_dtype), lse


def _select_layer(k_pages, v_pages, layer):
    """(k, v, exists, index): layer `layer` of a stacked cache [N, <pages>] (semantics.md,
    "Stacked caches"), whether that layer exists, and the (clipped) index it was read at.
    Without `layer`: the cache itself. A Python int outside [0, N) raises; a runtime one
    reads a clipped layer whose use the caller voids through `exists`."""
    if layer is None:
        return k_pages, v_pages, jnp.asarray(True), None
    n = k_pages.shape[0]
    index, exists = pages.layer_index(layer, n)
    if isinstance(index, int) and not exists:
        raise ValueError(f"layer: {index} outside [0, {n})")
    if n == 0:   # nothing to read: an empty stand-in layer that no request may use
        return (jnp.zeros(k_pages.shape[1:], k_pages.dtype),
                None if v_pages is None else jnp.zeros(v_pages.shape[1:], v_pages.dtype),
                jnp.asarray(False), None)
    index = jnp.clip(jnp.asarray(index, jnp.int32), 0, n - 1)

    def take(pages):
        if pages is None:
            return None
        return jax.lax.dynamic_index_in_dim(pages, index, 0, keepdims=False)

    return take(k_pages), take(v_pages), jnp.asarray(exists), index


def _as_jnp(pages):
    return None if pages is None else jnp.asarray(pages)


def _checked(q, k_pages, v_pages, block_tables, seq_lens, kv_layout, scale, k_scale,
             v_scale, window_left, logits_soft_cap, sinks, out_dtype, layer):
    """The public API's own checks (checks.py, pages.py), then the operands in the form
    `_attention` takes: (dense q, layer's pages, layer exists, traced args, static args)."""
    spec = pages.PagePool(k_pages, v_pages, kv_layout, layer, flatten=False)
    k_pages, v_pages = _as_jnp(k_pages), _as_jnp(v_pages)
    qv, opts = checks.attention_options(q, spec, block_tables, seq_lens, scale, window_left,
                                        logits_soft_cap, sinks, out_dtype)
    k_layer, v_layer, exists, _ = _select_layer(k_pages, v_pages, layer)
    scales = checks.scales(k_scale, v_scale)
    traced = dict(scale=jnp.float32(opts.scale), k_scale=scales[0], v_scale=scales[1],
                  soft_cap=jnp.float32(opts.softcap) if opts.softcap else None,
                  sinks=opts.sinks)
    static = dict(kv_layout=kv_layout, window_left=opts.window_left,
                  out_dtype=jnp.dtype(opts.out_dtype),
                  budget=_STEP_BUDGET_BYTES)     # read per call so tests can shrink it
    # A plain q is used as it is (materializing its trivial view would be a full gather).
    return qv, views.materialize(q), k_layer, v_layer, exists, traced, static


# --------------------------------------------------------------------------------------------
# Public API (the signatures of jax_paged_attn's ops; docs/api.md)
# --------------------------------------------------------------------------------------------

def paged_decode(q, k_pages, v_pages, block_tables, seq_lens, *, kv_layout="NHD", scale=None,
                 k_scale=None, v_scale=None, window_left=-1, logits_soft_cap=None, sinks=None,
                 q_len_per_req=1, return_lse=False, out_dtype=None, layer=None):
    """Decode: request b owns query rows [b*n, (b+1)*n), n = q_len_per_req; always causal.
    Arguments, shapes and dtypes as `jax_paged_attn.paged_decode`."""
    qv, q, k_pages, v_pages, exists, traced, static = _checked(
        q, k_pages, v_pages, block_tables, seq_lens, kv_layout, scale, k_scale, v_scale,
        window_left, logits_soft_cap, sinks, out_dtype, layer)
    n = checks.decode_queries(qv, block_tables, q_len_per_req)
    out, lse = _attention(q, k_pages, v_pages, block_tables, seq_lens, None, exists, **traced,
                          max_rows=n, causal=True, q_len_per_req=n, **static)
    return (out, lse) if checks.check_bool(return_lse, "return_lse") else out


def paged_prefill(q, k_pages, v_pages, block_tables, seq_lens, cu_seqlens_q, *, max_q_len,
                  causal=True, kv_layout="NHD", scale=None, k_scale=None, v_scale=None,
                  window_left=-1, logits_soft_cap=None, sinks=None, return_lse=False,
                  out_dtype=None, layer=None):
    """Prefill / chunked prefill: request b owns rows [e[b], e[b+1]) of the ragged batch.
    Arguments, shapes and dtypes as `jax_paged_attn.paged_prefill`."""
    qv, q, k_pages, v_pages, exists, traced, static = _checked(
        q, k_pages, v_pages, block_tables, seq_lens, kv_layout, scale, k_scale, v_scale,
        window_left, logits_soft_cap, sinks, out_dtype, layer)
    max_q_len = checks.prefill_queries(block_tables, cu_seqlens_q, max_q_len)
    out, lse = _attention(q, k_pages, v_pages, block_tables, seq_lens, cu_seqlens_q, exists,
                          **traced, max_rows=max_q_len,
                          causal=checks.check_bool(causal, "causal"), q_len_per_req=1,
                          **static)
    return (out, lse) if checks.check_bool(return_lse, "return_lse") else out


def _quantize(x, scale, dtype):
    """x / scale in float32, saturated to the finite range for fp8, then round-to-nearest-even
    (what astype does) into the page dtype."""
    x = x.astype(jnp.float32)
    if scale is not None:
        # XLA rewrites `x / broadcast(s)` into `x * (1/s)`, which is off by an ulp for ~40%
        # of values; the barrier keeps a true IEEE division (exact on CPU; XLA's GPU f32
        # division is div.full, within 2 ulp, so run this on the CPU backend where bit
        # exactness of stored pages matters).
        divisor = jnp.broadcast_to(_f32_scalar(scale, 1.0), x.shape)
        x = x / jax.lax.optimization_barrier(divisor)
    if _is_float8(dtype):
        fmax = float(jnp.finfo(dtype).max)          # 448 for float8_e4m3fn
        x = jnp.clip(x, -fmax, fmax)
    return x.astype(dtype)


def append_kv(k_pages, v_pages, k, v, slot_mapping, *, kv_layout="NHD", k_scale=None,
              v_scale=None, layer=None):
    """Write token t's K/V ([T, Hkv, D]) into slot `slot_mapping[t]` = page * page_size +
    offset, for every KV head. Negative or out-of-range slots skip the token. Returns
    (k_pages, v_pages), or (kv_pages, None) for combined pages. With `layer`, the pages are a
    stack [num_layers, <pages>]: only layer `layer` is written (none if it does not exist).
    Arguments as `jax_paged_attn.append_kv`."""
    spec = pages.PagePool(k_pages, v_pages, kv_layout, layer, flatten=False)
    k_pages, v_pages = _as_jnp(k_pages), _as_jnp(v_pages)
    kv, vv = checks.append_tokens(spec, k, v, slot_mapping)
    k, v = views.materialize(kv), views.materialize(vv)
    scales = checks.scales(k_scale, v_scale)
    k_scale, v_scale = scales[0], scales[1]
    k_layer, v_layer, exists, index = _select_layer(k_pages, v_pages, layer)
    slot = jnp.where(exists, jnp.asarray(slot_mapping).astype(jnp.int32), -1)
    k_new, v_new = _append_pages(k_layer, v_layer, k, v, slot, kv_layout, k_scale, v_scale)
    if layer is None:
        return k_new, v_new
    if index is None:   # an empty stack
        return k_pages, v_pages

    def put(stack, new):
        return None if stack is None else jax.lax.dynamic_update_index_in_dim(stack, new,
                                                                              index, 0)

    return put(k_pages, k_new), put(v_pages, v_new)


def _append_pages(k_pages, v_pages, k, v, slot, kv_layout, k_scale, v_scale):
    """append_kv on one (unstacked, checked) cache."""
    num_pages, page_size, hkv, d = _page_geometry(k_pages, v_pages, kv_layout)

    # Skipped tokens are sent to page index P, which mode="drop" discards.
    ok = (slot >= 0) & (slot < num_pages * page_size)
    page = jnp.where(ok, slot // page_size, num_pages)
    off = jnp.where(ok, slot % page_size, 0)
    kq = _quantize(k, k_scale, k_pages.dtype)
    vq = _quantize(v, v_scale, k_pages.dtype)

    # Each index expression below selects a [T, Hkv, D] block (advanced indices first).
    if kv_layout == "interleaved":
        kv = k_pages.at[page, off, 0::2].set(kq, mode="drop")
        return kv.at[page, off, 1::2].set(vq, mode="drop"), None
    if v_pages is None:
        if kv_layout == "NHD":
            kv = k_pages.at[page, 0, off].set(kq, mode="drop")
            kv = kv.at[page, 1, off].set(vq, mode="drop")
        else:
            kv = k_pages.at[page, 0, :, off].set(kq, mode="drop")
            kv = kv.at[page, 1, :, off].set(vq, mode="drop")
        return kv, None
    if kv_layout == "NHD":
        return (k_pages.at[page, off].set(kq, mode="drop"),
                v_pages.at[page, off].set(vq, mode="drop"))
    return (k_pages.at[page, :, off].set(kq, mode="drop"),
            v_pages.at[page, :, off].set(vq, mode="drop"))
