"""`check_metadata`: find the first request whose runtime metadata the kernels would reject
(their rows would come back NaN) and raise an error naming it, eagerly or under checkify."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from . import pages

# (rule name, message template); the template is formatted with b (request) and the values.
_RULES = (
    ("negative_seq_len", "request {b}: seq_len {x} is negative"),
    ("capacity", "request {b}: seq_len {x} exceeds the block table's capacity {y} "
                 "(max_pages x page_size)"),
    ("cu_order", "request {b}: cu_seqlens_q is negative or non-monotonic at this request "
                 "(start {x}, end {y})"),
    ("cu_end", "request {b}: cu_seqlens_q ends at {x}, past the {y} query rows"),
    ("max_q_len", "request {b}: query length {x} exceeds max_q_len {y}"),
    ("q_len", "request {b}: seq_len {x} is shorter than its query length {y}"),
    ("page", "request {b}: block_tables holds page index {x} outside [0, {y})"),
)


def _rule_values(block_tables, seq_lens, num_pages, page_size, cu_seqlens_q, q_len_per_req,
                 num_tokens, max_q_len, window_left):
    """Per rule: (bad [B] bool, x [B], y [B]) arrays, all from jnp ops (traceable)."""
    bt = jnp.asarray(block_tables, jnp.int32)
    sl = jnp.asarray(seq_lens, jnp.int32)
    b, m = bt.shape
    cap = m * page_size
    zeros, none = jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool)
    cu_end_bad = max_bad = none
    if cu_seqlens_q is None:
        q_len = jnp.full((b,), q_len_per_req, jnp.int32)
        cu_bad = none
        cu_x = cu_y = zeros
    else:
        cu = jnp.asarray(cu_seqlens_q, jnp.int32)
        start, end = cu[:-1], cu[1:]
        run_max = jax.lax.cummax(cu, axis=0)[:-1]
        cu_bad = (start < 0) | (end < start) | (start < run_max)
        q_len = jnp.maximum(end - start, 0)
        cu_x, cu_y = start, end
        if num_tokens is not None:
            cu_end_bad = ~cu_bad & (end > num_tokens)
        if max_q_len is not None:
            max_bad = ~cu_bad & (q_len > max_q_len)
    # Pages holding the keys some row can see, [first_needed_key, seq_len), must be real.
    lo = (jnp.maximum(sl - q_len - window_left, 0) if window_left >= 0 else zeros)
    col = jnp.arange(m)[None, :] * page_size
    used = (col < sl[:, None]) & (col + page_size > lo[:, None])
    bad_page = used & ((bt < 0) | (bt >= num_pages))
    first_bad_col = jnp.argmax(bad_page, axis=1)
    bad_val = jnp.take_along_axis(bt, first_bad_col[:, None], axis=1)[:, 0]
    base_ok = (sl >= 0) & (sl <= cap) & ~cu_bad & ~cu_end_bad & ~max_bad
    return {
        "negative_seq_len": (sl < 0, sl, sl),
        "capacity": (sl > cap, sl, jnp.full((b,), cap, jnp.int32)),
        "cu_order": (cu_bad, cu_x, cu_y),
        "cu_end": (cu_end_bad, cu_y, jnp.full((b,), -1 if num_tokens is None else num_tokens,
                                              jnp.int32)),
        "max_q_len": (max_bad, q_len, jnp.full((b,), -1 if max_q_len is None else max_q_len,
                                               jnp.int32)),
        "q_len": (base_ok & (sl < q_len), sl, q_len),
        # Pages matter only for requests that own query rows (semantics rule 3).
        "page": (base_ok & (q_len > 0) & jnp.any(bad_page, axis=1), bad_val,
                 jnp.full((b,), num_pages, jnp.int32)),
    }


def _is_concrete(*xs):
    try:
        for x in xs:
            if x is not None:
                np.asarray(x)
        return True
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return False


def _layer_rule(num_layers):
    """The bad-layer message, left with {x} for the layer (checkify formats only arrays)."""
    return "check_metadata: layer {x} outside [0, " + str(int(num_layers)) + ")"


def _check_positive_ints(**values):
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"check_metadata: {name} must be a positive int, got {v!r}")


def _layer_in_range(layer, num_layers):
    """(layer as given, in range?): True without a stacked cache, a Python bool for a Python
    int layer (raising at once when it is out of range), else a bool scalar array."""
    if (layer is None) != (num_layers is None):
        raise ValueError("check_metadata: layer and num_layers go together (a stacked "
                         f"cache's layer index and its number of layers), got layer={layer!r}"
                         f", num_layers={num_layers!r}")
    if layer is None:
        return None, True
    _check_positive_ints(num_layers=num_layers)
    index, ok = pages.layer_index(layer, int(num_layers))   # raises for a non-integer layer
    if ok is False:
        raise ValueError(_layer_rule(num_layers).format(x=index))
    return layer, ok


def check_metadata(block_tables, seq_lens, *, num_pages, page_size, cu_seqlens_q=None,
                   q_len_per_req=1, layer=None, num_layers=None, num_tokens=None,
                   max_q_len=None, window_left=-1):
    """Raises `ValueError` naming the first request with invalid runtime metadata.

    Called on concrete arrays it checks eagerly; inside a function transformed by
    `jax.experimental.checkify.checkify` it adds checks whose error names the request.

    Pass what the op call is given to check every rule the kernels apply: `num_tokens` (q's
    rows, T) for "cu_seqlens_q ends past T", `max_q_len` for "a query length exceeds
    max_q_len" (prefill), `window_left` so that only the pages a row can see are checked
    (a sliding window never reads the pages before it). Left out, those rules are not
    checked, and every page below seq_len is.

    Stacked caches: pass the `layer` given to the ops and `num_layers` (the stack's leading
    axis); `num_pages` is then the number of pages of ONE layer (the stack's second axis). A
    layer outside [0, num_layers) is reported first, as "layer {x} outside [0, {N})".
    """
    _check_positive_ints(num_pages=num_pages, page_size=page_size,
                         q_len_per_req=q_len_per_req)
    for name, v in (("num_tokens", num_tokens), ("max_q_len", max_q_len)):
        if v is not None:
            _check_positive_ints(**{name: v})
    if isinstance(window_left, bool) or not isinstance(window_left, (int, np.integer)):
        raise ValueError(f"check_metadata: window_left must be an int, got {window_left!r}")
    layer, layer_ok = _layer_in_range(layer, num_layers)
    rules = _rule_values(block_tables, seq_lens, int(num_pages), int(page_size), cu_seqlens_q,
                         int(q_len_per_req), None if num_tokens is None else int(num_tokens),
                         None if max_q_len is None else int(max_q_len), int(window_left))
    if _is_concrete(layer_ok, *(v[0] for v in rules.values())):
        if not bool(np.asarray(layer_ok)):
            raise ValueError(_layer_rule(num_layers).format(x=int(np.asarray(layer))))
        bad = {k: np.asarray(v[0]) for k, v in rules.items()}
        for b in range(len(np.asarray(seq_lens))):
            for name, template in _RULES:
                if bad[name][b]:
                    x, y = (int(np.asarray(a)[b]) for a in rules[name][1:])
                    raise ValueError("check_metadata: " + template.format(b=b, x=x, y=y))
        return
    # A bad layer is the error (every request is invalid then); otherwise name the first bad
    # request (as the eager path does) with its first failing rule: only one check fires.
    if not isinstance(layer_ok, bool):
        checkify.check(layer_ok, _layer_rule(num_layers), x=jnp.asarray(layer))
    masks = jnp.stack([rules[name][0] for name, _ in _RULES]) & layer_ok  # [rules, B]
    first_rule = jnp.argmax(masks, axis=0)                       # per request
    any_bad = jnp.any(masks, axis=0)
    first = jnp.argmax(any_bad)
    for r, (name, template) in enumerate(_RULES):
        _, x, y = rules[name]
        fires = any_bad[first] & (first_rule[first] == r)
        checkify.check(~fires, "check_metadata: " + template, b=first, x=x[first], y=y[first])
