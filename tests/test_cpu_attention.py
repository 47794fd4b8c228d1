"""CPU FFI kernels against the float32 reference on a grid covering every option.

The grid lives in ``cases.py`` (DECODE_GRID, PREFILL_GRID) so a device suite can reuse it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cases
import jax_paged_attn as jpa
from conftest import assert_bitwise, assert_close
from jax_paged_attn import reference as ref

pytestmark = pytest.mark.usefixtures("on_cpu")

OPS = {"decode": (jpa.paged_decode, ref.paged_decode), "prefill": (jpa.paged_prefill, ref.paged_prefill)}


def check_against_reference(inp: cases.Inputs, out, lse, r_out, r_lse):
    c = inp.case
    T, Hq, D = inp.num_tokens, c.num_q_heads, c.head_dim
    assert out.shape == (T, Hq, D)
    assert out.dtype == cases.DTYPES[c.out_dtype_name], (out.dtype, c.out_dtype_name)
    # the oracle itself must be clean on valid metadata
    assert not cases.invalid_requests(
        inp.block_tables, inp.seq_lens, num_pages=inp.num_pages, page_size=c.page_size,
        num_tokens=T, cu_seqlens_q=inp.cu_seqlens_q, q_len_per_req=c.q_len_per_req,
        max_q_len=inp.kwargs.get("max_q_len"), window_left=c.window_left)
    assert not np.isnan(r_out).any() and not np.isnan(r_lse).any(), "reference produced NaN"
    pad = cases.padding_rows(inp)
    # rows owned by no request: exactly 0 and lse -inf, even with sinks
    assert np.all(out[pad].astype(np.float32) == 0)
    assert_close(out, r_out)
    if c.return_lse:
        assert lse.shape == (T, Hq) and lse.dtype == np.float32
        assert np.all(lse[pad] == -np.inf)
        assert np.all(np.isfinite(lse[~pad]))
        assert_close(lse, r_lse, cases.LSE_TOLERANCE, what="lse")
    else:
        assert lse is None


@pytest.mark.parametrize("case", cases.DECODE_GRID, ids=lambda c: c.id())
def test_decode_matches_reference(case):
    inp = cases.make_inputs(case)
    out, lse = cases.run(jpa.paged_decode, inp)
    r_out, r_lse = cases.run_reference(ref.paged_decode, inp)
    check_against_reference(inp, out, lse, r_out, r_lse)


@pytest.mark.parametrize("case", cases.PREFILL_GRID, ids=lambda c: c.id())
def test_prefill_matches_reference(case):
    inp = cases.make_inputs(case)
    out, lse = cases.run(jpa.paged_prefill, inp)
    r_out, r_lse = cases.run_reference(ref.paged_prefill, inp)
    check_against_reference(inp, out, lse, r_out, r_lse)


# ----------------------------------------------------------------------------- properties
# Checks that do not lean on the reference at all.


@pytest.mark.parametrize("kind", ["decode", "prefill"])
@pytest.mark.parametrize("kv_dtype", ["f32", "bf16", "fp8"])
def test_layouts_agree(kind, kv_dtype):
    """NHD, HND and combined pages holding the same logical cache give the same result."""
    sc = dict(k_scale=0.6, v_scale=1.4) if kv_dtype == "fp8" else {}
    base = cases.AttnCase(kind=kind, kv_dtype=kv_dtype, page_size=5, seed=77, **sc)
    inp = cases.make_inputs(base)
    fn = OPS[kind][0]
    results = []
    for lay in ("NHD", "HND"):
        for comb in (False, True):
            kp, vp = cases.pack_pages(inp.k_logical, inp.v_logical, lay, comb)
            kw = dict(inp.kwargs, kv_layout=lay)
            a = list(inp.args)
            a[1], a[2] = kp, vp
            results.append(cases.run(fn, dataclasses.replace(inp, args=tuple(a), kwargs=kw)))
    for out, lse in results[1:]:
        assert_close(out, results[0][0], 1e-6)
        assert_close(lse, results[0][1], 1e-6, what="lse")


@pytest.mark.parametrize("v_scale", [None, 0.75])
def test_single_key_returns_its_value(v_scale):
    """With one visible key the softmax weight is exactly 1: out == v * v_scale."""
    case = cases.AttnCase(max_kv_len=1, batch=4, v_scale=v_scale, seed=5)
    inp = cases.make_inputs(case)
    assert np.all(inp.kv_lens == 1)
    out, lse = cases.run(jpa.paged_decode, inp)
    vs = np.float32(1.0 if v_scale is None else v_scale)
    q = inp.q.astype(np.float32)
    for b in range(case.batch):
        page = inp.block_tables[b, 0]
        for h in range(case.num_q_heads):
            kvh = h // case.group
            v = inp.v_logical[page, 0, kvh].astype(np.float32) * vs
            k = inp.k_logical[page, 0, kvh].astype(np.float32)
            np.testing.assert_array_equal(out[b, h], v)
            s = np.dot(q[b, h], k) / np.sqrt(np.float32(case.head_dim))
            np.testing.assert_allclose(lse[b, h], s, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_sinks_rescale_output(kind):
    """A sink only adds to the denominator: lse' = logaddexp(lse, sink), out' = out * e^(lse-lse')."""
    case = cases.AttnCase(kind=kind, seed=11, sinks=True, q_len_per_req=2 if kind == "decode" else 1)
    inp = cases.make_inputs(case)
    fn = OPS[kind][0]
    out_s, lse_s = cases.run(fn, inp)
    kw = dict(inp.kwargs)
    sinks = kw.pop("sinks")
    out_n, lse_n = cases.run(fn, dataclasses.replace(inp, kwargs=kw))
    assert not np.allclose(out_s, out_n)
    np.testing.assert_allclose(lse_s, np.logaddexp(lse_n, sinks[None, :]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out_s, out_n * np.exp(lse_n - lse_s)[..., None], rtol=2e-5, atol=2e-6)


def test_sink_minus_inf_is_no_sink():
    case = cases.AttnCase(seed=12, q_len_per_req=2)
    inp = cases.make_inputs(case)
    out, lse = cases.run(jpa.paged_decode, inp)
    out_s, lse_s = cases.run(jpa.paged_decode, inp,
                             sinks=np.full(case.num_q_heads, -np.inf, np.float32))
    assert_close(out_s, out, 1e-6)
    assert_close(lse_s, lse, 1e-6, what="lse")


def test_huge_soft_cap_is_no_cap():
    inp = cases.make_inputs(cases.AttnCase(seed=13))
    out, lse = cases.run(jpa.paged_decode, inp)
    out_c, lse_c = cases.run(jpa.paged_decode, inp, logits_soft_cap=1e7)
    assert_close(out_c, out, 1e-5)
    assert_close(lse_c, lse, 1e-5, what="lse")


def test_soft_cap_bounds_logits():
    """With cap c every logit lies in (-c, c), so lse <= c + log(L)."""
    cap = 0.25
    inp = cases.make_inputs(cases.AttnCase(seed=14, scale=5.0))
    _, lse = cases.run(jpa.paged_decode, inp, logits_soft_cap=cap)
    L = inp.kv_lens.astype(np.float32)
    assert np.all(lse <= cap + np.log(L)[:, None] + 1e-5)
    assert np.all(lse >= -cap + np.log(L)[:, None] - 1e-5)


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_huge_window_is_no_window(kind):
    inp = cases.make_inputs(cases.AttnCase(kind=kind, seed=15, garbage_tables=False))
    fn = OPS[kind][0]
    out, lse = cases.run(fn, inp)
    out_w, lse_w = cases.run(fn, inp, window_left=10_000)
    assert_close(out_w, out, 1e-6)
    assert_close(lse_w, lse, 1e-6, what="lse")


def test_window_zero_sees_only_itself():
    """window_left=0 (causal): each row attends to the key at its own position only."""
    case = cases.AttnCase(seed=16, window_left=0, q_len_per_req=2, page_size=3)
    inp = cases.make_inputs(case)
    out, _ = cases.run(jpa.paged_decode, inp)
    for b in range(case.batch):
        L = int(inp.kv_lens[b])
        for i in range(2):
            pos = L - 2 + i
            page = inp.block_tables[b, pos // case.page_size]
            for h in range(case.num_q_heads):
                v = inp.v_logical[page, pos % case.page_size, h // case.group].astype(np.float32)
                np.testing.assert_array_equal(out[2 * b + i, h], v)


@pytest.mark.parametrize("n", [1, 3])
def test_decode_equals_prefill_with_equal_lengths(n):
    """Decode with q_len_per_req=n is causal prefill with every q length n."""
    case = cases.AttnCase(seed=17 + n, q_len_per_req=n, sinks=True, window_left=4, page_size=3)
    inp = cases.make_inputs(case)
    out_d, lse_d = cases.run(jpa.paged_decode, inp)
    cu = (np.arange(case.batch + 1) * n).astype(np.int32)
    kw = {k: v for k, v in inp.kwargs.items() if k != "q_len_per_req"}
    out_p, lse_p = jpa.paged_prefill(*inp.args, cu, max_q_len=n, **kw)
    assert_close(np.asarray(out_p), out_d, 1e-6)
    assert_close(np.asarray(lse_p), lse_d, 1e-6, what="lse")


def test_default_scale_is_rsqrt_head_dim():
    case = cases.AttnCase(seed=19, head_dim=32)
    inp = cases.make_inputs(case)
    out, lse = cases.run(jpa.paged_decode, inp)
    out_s, lse_s = cases.run(jpa.paged_decode, inp, scale=1.0 / np.sqrt(32.0))
    assert_close(out_s, out, 1e-6)
    assert_close(lse_s, lse, 1e-6, what="lse")
    out_2, _ = cases.run(jpa.paged_decode, inp, scale=2.0 / np.sqrt(32.0))
    assert not np.allclose(out_2, out, rtol=1e-3)


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_traced_scales_equal_python_scales(kind):
    case = cases.AttnCase(kind=kind, seed=20, kv_dtype="fp8", q_dtype="bf16", k_scale=0.4, v_scale=1.6)
    inp = cases.make_inputs(case)
    fn = OPS[kind][0]
    out, lse = cases.run(fn, inp)
    out_t, lse_t = cases.run(fn, inp, k_scale=jnp.float32(0.4), v_scale=jnp.asarray(1.6, jnp.float32))
    assert_bitwise(out_t, out)
    assert_bitwise(lse_t, lse, "lse")


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_unneeded_table_entries_are_never_read(kind):
    """Changing entries no row needs (past the sequence, before the window) changes nothing."""
    case = cases.AttnCase(kind=kind, seed=21, window_left=3, page_size=2, garbage_tables=True,
                          q_len_per_req=1)
    inp = cases.make_inputs(case)
    fn = OPS[kind][0]
    out, lse = cases.run(fn, inp)
    bt = inp.block_tables.copy()
    garbage = ~((bt >= 0) & (bt < inp.num_pages))
    assert garbage.any()
    for val in (0, inp.num_pages - 1, -(2**31), 2**31 - 1):
        bt2 = np.where(garbage, np.int32(val), bt)
        out2, lse2 = cases.run(fn, inp.with_args(block_tables=bt2))
        assert_bitwise(out2, out)
        assert_bitwise(lse2, lse, "lse")


def test_page_contents_outside_the_request_are_ignored():
    """Scribbling on pages no request uses leaves the result bit-identical."""
    inp = cases.make_inputs(cases.AttnCase(seed=22, extra_pages=4, kv_dtype="bf16"))
    out, lse = cases.run(jpa.paged_decode, inp)
    used = set(int(p) for b in range(inp.case.batch)
               for p in inp.block_tables[b, : -(-int(inp.kv_lens[b]) // inp.page_size)])
    unused = [p for p in range(inp.num_pages) if p not in used]
    assert unused
    kp, vp = inp.args[1].copy(), inp.args[2].copy()
    kp[unused] = np.asarray(1e4, kp.dtype)
    vp[unused] = np.asarray(-1e4, vp.dtype)
    out2, lse2 = cases.run(jpa.paged_decode, inp.with_args(k_pages=kp, v_pages=vp))
    assert_bitwise(out2, out)
    assert_bitwise(lse2, lse, "lse")


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_repeatable(kind):
    inp = cases.make_inputs(cases.AttnCase(kind=kind, seed=23, kv_dtype="bf16", q_dtype="bf16"))
    fn = OPS[kind][0]
    a = cases.run(fn, inp)
    b = cases.run(fn, inp)
    assert_bitwise(a[0], b[0])
    assert_bitwise(a[1], b[1], "lse")


def test_prefill_padding_and_empty_requests():
    """Padding rows and q_len-0 requests: zeros / -inf, neighbours exact."""
    case = cases.AttnCase(kind="prefill", batch=5, zero_q_lens=True, pad_front=2, pad_back=3,
                          sinks=True, seed=24)
    inp = cases.make_inputs(case)
    assert (inp.q_lens == 0).sum() >= 2
    out, lse = cases.run(jpa.paged_prefill, inp)
    pad = cases.padding_rows(inp)
    assert pad.sum() == 5
    assert np.all(out[pad] == 0) and np.all(lse[pad] == -np.inf)
    r_out, r_lse = cases.run_reference(ref.paged_prefill, inp)
    assert_close(out, r_out)
    assert_close(lse, r_lse, cases.LSE_TOLERANCE, what="lse")


def test_prefill_causal_differs_from_non_causal():
    case = cases.AttnCase(kind="prefill", seed=25, max_q_len=5)
    inp = cases.make_inputs(case)
    out_c, _ = cases.run(jpa.paged_prefill, inp)
    out_n, _ = cases.run(jpa.paged_prefill, inp, causal=False)
    # the last row of every request sees every key either way; earlier rows differ
    for b in range(case.batch):
        lo, hi = int(inp.cu_seqlens_q[b]), int(inp.cu_seqlens_q[b + 1])
        np.testing.assert_allclose(out_c[hi - 1], out_n[hi - 1], rtol=1e-6, atol=1e-6)
        if hi - lo > 1:
            assert not np.allclose(out_c[lo], out_n[lo])


@pytest.mark.parametrize("q_dtype", ["f32", "bf16", "f16"])
@pytest.mark.parametrize("out_dtype", [None, "f32", "bf16", "f16"])
def test_output_dtypes_and_shapes(q_dtype, out_dtype):
    T, Hq, Hkv, D, P, ps = 4, 4, 2, 16, 5, 4
    q = jax.ShapeDtypeStruct((T, Hq, D), cases.DTYPES[q_dtype])
    kp = jax.ShapeDtypeStruct((P, ps, Hkv, D), jnp.bfloat16)
    bt = jax.ShapeDtypeStruct((T, 3), jnp.int32)
    sl = jax.ShapeDtypeStruct((T,), jnp.int32)
    kw = {} if out_dtype is None else {"out_dtype": cases.DTYPES[out_dtype]}
    out, lse = jax.eval_shape(lambda *a: jpa.paged_decode(*a, return_lse=True, **kw), q, kp, kp, bt, sl)
    assert out.shape == (T, Hq, D) and lse.shape == (T, Hq)
    assert out.dtype == cases.DTYPES[out_dtype or q_dtype] and lse.dtype == jnp.float32
    only = jax.eval_shape(lambda *a: jpa.paged_decode(*a, **kw), q, kp, kp, bt, sl)
    assert isinstance(only, jax.ShapeDtypeStruct) and only.shape == (T, Hq, D)
