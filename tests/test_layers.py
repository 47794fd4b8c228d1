"""Stacked, layer-indexed caches (`layer=`): every op on `stack` with `layer=l` is bitwise the
same op on `stack[l]` (Python int or traced layer, in jit and in a scan over layers); other
layers are never written; a runtime layer out of range gives NaN rows / no writes; static
misuse raises naming `layer`; donation keeps a stacked append in place."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import cases
import jax_paged_attn as jpa
from conftest import assert_bitwise, assert_close
from jax_paged_attn import reference as ref
from test_append import _aliases

pytestmark = pytest.mark.usefixtures("on_cpu")

put = cases.put
N = 3  # layers in every stack below

PAGE_KINDS = {  # name -> AttnCase fields
    "NHD": dict(kv_layout="NHD"),
    "HND": dict(kv_layout="HND", kv_dtype="bf16", q_dtype="bf16"),
    "combined": dict(kv_layout="HND", combined=True, kv_dtype="fp8", q_dtype="bf16",
                     k_scale=0.6, v_scale=1.4),
}
OPS = {"decode": (jpa.paged_decode, ref.paged_decode),
       "prefill": (jpa.paged_prefill, ref.paged_prefill)}


def _case(op, kind, **kw):
    seed = 200 + 10 * sorted(OPS).index(op) + sorted(PAGE_KINDS).index(kind)
    base = dict(kind=op, batch=3, max_kv_len=21, seed=seed)
    if op == "prefill":
        base.update(max_q_len=4, pad_back=2)
    return cases.AttnCase(**{**base, **PAGE_KINDS[kind], **kw})


def _stack(inp, seed):
    """[N, ...] K (and V) stacks whose layer 1 is the case's own cache and whose other layers
    are fresh random pages of the same shape (so reading a wrong layer shows)."""
    c = inp.case
    rng = np.random.default_rng(seed)
    ks, vs = [], []
    for layer in range(N):
        if layer == 1:
            k, v = inp.args[1], inp.args[2]
        else:
            k, v = cases.pack_pages(*cases.make_pages(rng, inp.num_pages, c.page_size,
                                                      c.num_kv_heads, c.head_dim, c.kv_dtype),
                                    c.kv_layout, c.combined)
        ks.append(k), vs.append(v)
    return np.stack(ks), None if c.combined else np.stack(vs)


def _call(fn, inp, kp, vp, **kw):
    """fn(q, kp, vp, <metadata>) with the case's options; (out, lse) as numpy."""
    args = [put(a) for a in (inp.args[0], kp, vp, *inp.args[3:])]
    kwargs = {k: put(v) for k, v in {**inp.kwargs, "return_lse": True, **kw}.items()}
    out, lse = fn(*args, **kwargs)
    return np.asarray(out), np.asarray(lse)


def _layer_of(stack, layer):
    return None if stack is None else stack[layer]


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("kind", sorted(PAGE_KINDS))
@pytest.mark.parametrize("op", sorted(OPS))
def test_attention_on_a_layer_equals_the_sliced_layer(op, kind):
    inp = cases.make_inputs(_case(op, kind))
    ks, vs = _stack(inp, seed=1)
    fn, rfn = OPS[op]
    traced = jax.jit(lambda *a, layer: fn(*a, **dict(inp.kwargs, return_lse=True),
                                          layer=layer))
    args = [put(a) for a in (inp.args[0], ks, vs, *inp.args[3:])]
    outs = []
    for layer in range(N):
        want = _call(fn, inp, ks[layer], _layer_of(vs, layer))
        got = _call(fn, inp, ks, vs, layer=layer)
        got_traced = traced(*args, layer=jnp.int32(layer))
        for g in (got, got_traced):
            assert_bitwise(np.asarray(g[0]), want[0], f"out, layer {layer}")
            assert_bitwise(np.asarray(g[1]), want[1], f"lse, layer {layer}")
        # the reference follows the same contract
        r_want = _call(rfn, inp, ks[layer], _layer_of(vs, layer))
        r_got = _call(rfn, inp, ks, vs, layer=jnp.int32(layer))
        assert_bitwise(r_got[0], r_want[0], f"reference out, layer {layer}")
        assert_close(want[0], r_want[0], nan_ok=True)
        outs.append(want[0].astype(np.float32))
    assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[1], outs[2])


def test_traced_layer_does_not_retrace_and_lowers_without_a_copy():
    inp = cases.make_inputs(_case("decode", "HND", head_dim=64))   # GPU-supported
    ks, vs = _stack(inp, seed=2)
    traces = []

    def step(q, kp, vp, bt, sl, layer):
        traces.append(1)
        return jpa.paged_decode(q, kp, vp, bt, sl, layer=layer)

    f = jax.jit(step)
    args = [put(a) for a in (inp.args[0], ks, vs, *inp.args[3:])]
    for layer in range(N):
        f(*args, jnp.int32(layer))
    assert len(traces) == 1
    # The custom call reads the stack through a reshape: no slice or gather of the pages.
    text = f.trace(*args, jnp.int32(0)).lower(lowering_platforms=("cuda",)).as_text()
    assert "jpa_paged_decode" in text
    assert "dynamic_slice" not in text and "gather" not in text, text


def test_scan_over_layers_decode_and_append_equals_per_layer_calls():
    """A model step: per layer append each request's new token into a carried stack (layer
    = the scan counter), then decode with it; equals the same on unstacked per-layer caches."""
    case = _case("decode", "HND", garbage_tables=False, q_len_per_req=1)
    inp = cases.make_inputs(case)
    ks, vs = _stack(inp, seed=3)
    B, Hkv, D, ps = case.batch, case.num_kv_heads, case.head_dim, case.page_size
    bt, sl = inp.block_tables, inp.seq_lens
    pos = sl - 1                                   # the newest token of each request
    slots = (bt[np.arange(B), pos // ps] * ps + pos % ps).astype(np.int32)
    rng = np.random.default_rng(4)
    new_k = rng.standard_normal((N, B, Hkv, D), dtype=np.float32).astype(ks.dtype)
    new_v = rng.standard_normal((N, B, Hkv, D), dtype=np.float32).astype(ks.dtype)
    opts = dict(kv_layout=case.kv_layout)

    def step(q, ks, vs, new_k, new_v, bt, sl, slots):
        def layer(carry, xs):
            x, ks, vs = carry
            i, k, v = xs
            ks, vs = jpa.append_kv(ks, vs, k, v, slots, layer=i, **opts)
            out = jpa.paged_decode(x, ks, vs, bt, sl, layer=i, **opts)
            return (out, ks, vs), out
        (_, ks, vs), outs = jax.lax.scan(layer, (q, ks, vs),
                                         (jnp.arange(N, dtype=jnp.int32), new_k, new_v))
        return outs, ks, vs

    args = [put(a) for a in (inp.q, ks, vs, new_k, new_v, bt, sl, slots)]
    outs, gk, gv = jax.jit(step, donate_argnums=(1, 2))(*args)
    x = put(inp.q)
    for i in range(N):
        kp, vp = jpa.append_kv(put(ks[i]), put(vs[i]), put(new_k[i]), put(new_v[i]),
                               put(slots), **opts)
        assert_bitwise(np.asarray(gk[i]), np.asarray(kp), f"k pages, layer {i}")
        assert_bitwise(np.asarray(gv[i]), np.asarray(vp), f"v pages, layer {i}")
        x = jpa.paged_decode(x, kp, vp, put(bt), put(sl), **opts)
        assert_bitwise(np.asarray(outs[i]), np.asarray(x), f"out, layer {i}")


def test_vmap_over_layers_with_a_shared_stack():
    inp = cases.make_inputs(_case("decode", "NHD"))
    ks, vs = _stack(inp, seed=5)
    q, bt, sl = (put(a) for a in (inp.q, inp.block_tables, inp.seq_lens))
    kj, vj = put(ks), put(vs)
    got = jax.vmap(lambda layer: jpa.paged_decode(q, kj, vj, bt, sl, layer=layer))(
        jnp.arange(N, dtype=jnp.int32))
    for layer in range(N):
        assert_bitwise(np.asarray(got[layer]),
                       np.asarray(jpa.paged_decode(q, kj[layer], vj[layer], bt, sl)))


# ----------------------------------------------------------------------------- append

APPEND = {
    "NHD": cases.AppendCase(kv_dtype="bf16", new_dtype="f32", skip_fraction=0.3, seed=30),
    "HND": cases.AppendCase(kv_dtype="fp8", new_dtype="bf16", kv_layout="HND",
                            k_scale=0.5, v_scale=1.5, seed=31),
    "combined": cases.AppendCase(kv_dtype="f16", new_dtype="f16", combined=True,
                                 kv_layout="HND", skip_fraction=0.2, seed=32),
}


def _append_stack(case):
    """A stack of N caches of `case` (independent random pages) plus new tokens and slots."""
    layers = [cases.make_append_inputs(dataclasses.replace(case, seed=case.seed + 100 * i))
              for i in range(N)]
    (_, _, k, v, slots), kw = layers[0]
    ks = np.stack([x[0][0] for x in layers])
    vs = None if case.combined else np.stack([x[0][1] for x in layers])
    return ks, vs, k, v, slots, kw


@pytest.mark.parametrize("kind", sorted(APPEND))
def test_append_writes_only_its_layer(kind):
    case = APPEND[kind]
    ks, vs, k, v, slots, kw = _append_stack(case)
    traced = jax.jit(lambda ks, vs, k, v, s, layer: jpa.append_kv(ks, vs, k, v, s, layer=layer,
                                                                  **kw))
    for layer in range(N):
        want = cases.expected_append(case, ks[layer], _layer_of(vs, layer), k, v, slots)
        results = [
            jpa.append_kv(put(ks), put(vs), put(k), put(v), put(slots), layer=layer, **kw),
            traced(put(ks), put(vs), put(k), put(v), put(slots), jnp.int32(layer)),
            ref.append_kv(put(ks), put(vs), put(k), put(v), put(slots), layer=layer, **kw),
        ]
        for gk, gv in results:
            assert gk.shape == ks.shape and (gv is None) == case.combined
            for i in range(N):
                wk = want[0] if i == layer else ks[i]
                assert_bitwise(np.asarray(gk[i]), wk, f"k pages of layer {i} (wrote {layer})")
                if not case.combined:
                    wv = want[1] if i == layer else vs[i]
                    assert_bitwise(np.asarray(gv[i]), wv, f"v pages of layer {i}")


def test_stacked_append_is_in_place_under_donation():
    case = cases.AppendCase(num_pages=32, page_size=16, num_tokens=8, kv_dtype="bf16",
                            new_dtype="bf16", seed=33)
    ks, vs, k, v, slots, _ = _append_stack(case)
    stack_bytes = ks.nbytes + vs.nbytes
    args = [put(a) for a in (ks, vs, k, v, slots)]

    def f(ks, vs, k, v, slots, layer):
        return jpa.append_kv(ks, vs, k, v, slots, layer=layer)

    compiled = jax.jit(f, donate_argnums=(0, 1)).lower(*args, jnp.int32(1)).compile()
    text = compiled.as_text()
    assert _aliases(text) == {0: 0, 1: 1}, text[:400]
    mem = compiled.memory_analysis()
    assert mem.alias_size_in_bytes >= stack_bytes
    assert mem.temp_size_in_bytes < ks[0].nbytes // 2, mem   # not even one layer copied
    assert "copy(" not in text, "XLA copied the stack"
    out = compiled(*args, jnp.int32(2))
    assert args[0].is_deleted() and args[1].is_deleted()
    want = cases.expected_append(case, ks[2], vs[2], k, v, slots)
    assert_bitwise(np.asarray(out[0][2]), want[0])
    assert_bitwise(np.asarray(out[0][0]), ks[0])


def test_scan_of_stacked_appends_keeps_the_cache_in_place():
    """A layer loop carrying the donated stack: no temporary the size of a layer."""
    case = cases.AppendCase(num_pages=32, page_size=16, num_tokens=8, kv_dtype="bf16",
                            new_dtype="bf16", seed=34)
    ks, vs, k, v, slots, _ = _append_stack(case)

    def loop(ks, vs, k, v, slots):
        def body(carry, i):
            return jpa.append_kv(*carry, k, v, slots, layer=i), None
        return jax.lax.scan(body, (ks, vs), jnp.arange(N, dtype=jnp.int32))[0]

    args = [put(a) for a in (ks, vs, k, v, slots)]
    compiled = jax.jit(loop, donate_argnums=(0, 1)).lower(*args).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < ks[0].nbytes // 2
    gk, gv = compiled(*args)
    want = cases.expected_append(case, ks[1], vs[1], k, v, slots)
    assert_bitwise(np.asarray(gk[1]), want[0])
    assert_bitwise(np.asarray(gv[1]), want[1])


def test_export_round_trip_of_stacked_ops():
    """jax.export works with a layer operand; the stacked append also carries XLA's
    LayoutConstraint custom calls (its row-major pins), which export must be told about."""
    inp = cases.make_inputs(_case("decode", "NHD"))
    ks, vs = _stack(inp, seed=7)
    case = APPEND["NHD"]
    aks, avs, k, v, slots, _ = _append_stack(case)

    def f(q, ks, vs, bt, sl, aks, avs, k, v, slots, layer):
        out = jpa.paged_decode(q, ks, vs, bt, sl, layer=layer)
        return out, jpa.append_kv(aks, avs, k, v, slots, layer=layer)

    args = [put(a) for a in (inp.q, ks, vs, inp.block_tables, inp.seq_lens, aks, avs, k, v,
                             slots)] + [jnp.int32(2)]
    checks = [jax.export.DisabledSafetyCheck.custom_call(t)
              for t in ("jpa_paged_decode", "jpa_append_kv", "LayoutConstraint")]
    exp = jax.export.export(jax.jit(f), disabled_checks=checks)(*args)
    got, want = exp.call(*args), jax.jit(f)(*args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert_bitwise(np.asarray(g), np.asarray(w))


# ----------------------------------------------------------------------------- out of range

BAD_LAYERS = (-1, N, 2**31 - 1, -(2**31))


@pytest.mark.parametrize("op", sorted(OPS))
def test_out_of_range_traced_layer_gives_nan_rows(op):
    extra = dict(zero_q_lens=True, batch=4, pad_front=1) if op == "prefill" else {}
    inp = cases.make_inputs(_case(op, "NHD", **extra))
    ks, vs = _stack(inp, seed=6)
    fn, rfn = OPS[op]
    c = inp.case
    ranges = cases.row_ranges(inp.num_tokens, c.batch, inp.cu_seqlens_q, c.q_len_per_req)
    owned = ~cases.padding_rows(inp)
    if op == "prefill":
        assert any(lo == hi for lo, hi in ranges) and not owned.all()
    f = jax.jit(lambda *a, layer: fn(*a, **dict(inp.kwargs, return_lse=True), layer=layer))
    args = [put(a) for a in (inp.args[0], ks, vs, *inp.args[3:])]
    for bad in BAD_LAYERS:
        out, lse = (np.asarray(x) for x in f(*args, layer=jnp.int32(bad)))
        assert np.isnan(out[owned].astype(np.float32)).all() and np.isnan(lse[owned]).all()
        assert (out[~owned].astype(np.float32) == 0).all() and (lse[~owned] == -np.inf).all()
        r_out, r_lse = _call(rfn, inp, ks, vs, layer=jnp.int32(bad))
        assert_close(out, r_out, nan_ok=True)
        assert_close(lse, r_lse, cases.LSE_TOLERANCE, nan_ok=True, what="lse")


@pytest.mark.parametrize("kind", ["NHD", "combined"])
def test_out_of_range_traced_layer_writes_nothing(kind):
    case = APPEND[kind]
    ks, vs, k, v, slots, kw = _append_stack(case)
    for fn in (jpa.append_kv, ref.append_kv):
        f = jax.jit(lambda ks, vs, k, v, s, layer: fn(ks, vs, k, v, s, layer=layer, **kw))
        for bad in BAD_LAYERS:
            gk, gv = f(put(ks), put(vs), put(k), put(v), put(slots), jnp.int32(bad))
            assert_bitwise(np.asarray(gk), ks)
            if vs is not None:
                assert_bitwise(np.asarray(gv), vs)


def test_check_metadata_names_a_bad_layer():
    inp = cases.make_inputs(_case("decode", "NHD", garbage_tables=False))
    bt, sl = inp.block_tables, inp.seq_lens
    kw = dict(num_pages=inp.num_pages, page_size=inp.case.page_size, num_layers=N)
    jpa.check_metadata(bt, sl, layer=N - 1, **kw)
    jpa.check_metadata(bt, sl, layer=jnp.int32(0), **kw)
    for bad in (N, jnp.int32(N), jnp.int32(-1)):
        with pytest.raises(ValueError, match=rf"layer {int(bad)} outside \[0, {N}\)"):
            jpa.check_metadata(bt, sl, layer=bad, **kw)

    def step(bt, sl, layer):
        jpa.check_metadata(bt, sl, layer=layer, **kw)
        return jnp.sum(sl)

    checked = checkify.checkify(jax.jit(step))
    assert checked(bt, sl, jnp.int32(1))[0].get() is None
    err, _ = checked(bt, sl, jnp.int32(N + 2))
    assert f"layer {N + 2} outside [0, {N})" in err.get()
    # a bad layer is reported even when a request is bad too; a good layer reports the request
    bad_bt = np.array(bt, copy=True)
    bad_bt[1, 0] = inp.num_pages
    assert "layer" in checked(bad_bt, sl, jnp.int32(-3))[0].get()
    assert "request 1" in checked(bad_bt, sl, jnp.int32(0))[0].get()
    with pytest.raises(ValueError, match="num_layers"):
        jpa.check_metadata(bt, sl, layer=0, num_pages=inp.num_pages, page_size=4)


# ----------------------------------------------------------------------------- static misuse

S = jax.ShapeDtypeStruct
STACK = S((N, 6, 4, 2, 16), jnp.bfloat16)
Q, BT, SL = S((3, 4, 16), jnp.bfloat16), S((3, 2), jnp.int32), S((3,), jnp.int32)
CU, NEW, SLOTS = S((4,), jnp.int32), S((3, 2, 16), jnp.bfloat16), S((3,), jnp.int32)


def _abstract(op, layer, pages=STACK):
    """Trace `op` on abstract operands (nothing runs) with `layer` passed through."""
    if op == "decode":
        return jax.eval_shape(lambda q, k, bt, sl: jpa.paged_decode(q, k, k, bt, sl,
                                                                    layer=layer),
                              Q, pages, BT, SL)
    if op == "prefill":
        return jax.eval_shape(lambda q, k, bt, sl, cu: jpa.paged_prefill(
            q, k, k, bt, sl, cu, max_q_len=2, layer=layer), Q, pages, BT, SL, CU)
    return jax.eval_shape(lambda k, new, s: jpa.append_kv(k, k, new, new, s, layer=layer),
                          pages, NEW, SLOTS)


@pytest.mark.parametrize("op", ["decode", "prefill", "append"])
def test_static_misuse_raises_naming_the_argument(op):
    for bad in (N, -1, 10**12):
        with pytest.raises(ValueError, match=rf"^layer: {bad} outside \[0, {N}\)"):
            _abstract(op, bad)
    for bad, exc in ((1.0, TypeError), (True, TypeError), ("1", TypeError),
                     (jnp.float32(1), TypeError), (jnp.array([1], jnp.int32), ValueError)):
        with pytest.raises(exc, match=r"^layer: "):
            _abstract(op, bad)
    with pytest.raises(ValueError, match=r"^k_pages: .*rank 5 .*layer given"):
        _abstract(op, 0, pages=S(STACK.shape[1:], jnp.bfloat16))
    # more slots than int32 can address (abstract: nothing is allocated)
    with pytest.raises(ValueError, match=r"^k_pages: .*2\*\*31"):
        _abstract(op, 0, pages=S((2**12, 2**18, 4, 2, 16), jnp.bfloat16))
    for layer in (0, jnp.int32(0), jnp.uint8(2), jnp.int16(1)):   # integer dtypes are fine
        _abstract(op, layer)
    with pytest.raises(ValueError, match=r"needs layer="):   # a stack without layer
        _abstract(op, None)
    with pytest.raises(ValueError, match=r"^layer: "):
        ref.paged_decode(jnp.zeros((3, 4, 16)), jnp.ones((N, 6, 4, 2, 16)),
                         jnp.ones((N, 6, 4, 2, 16)), jnp.zeros((3, 2), jnp.int32),
                         jnp.ones((3,), jnp.int32), layer=N)
