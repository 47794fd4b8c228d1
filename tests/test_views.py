"""Strided operands: split_qkv and general StridedViews give bit-identical results to dense
operands, and the lowering passes the packed buffer itself (no slice / copy) with the offset
and strides as attributes."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cases
import jax_paged_attn as jpa
from conftest import assert_bitwise
from jax_paged_attn.views import materialize

pytestmark = pytest.mark.usefixtures("on_cpu")

T, HQ, HKV, D = 6, 4, 2, 16  # the decode case below has batch 6, one token each


def _packed(rng, T, Hq, Hkv, D, dtype, three_d):
    x = rng.standard_normal((T, Hq + 2 * Hkv, D), dtype=np.float32).astype(cases.DTYPES[dtype])
    return x if three_d else x.reshape(T, (Hq + 2 * Hkv) * D)


def _slices(qkv, Hq, Hkv, D):
    x = qkv.reshape(qkv.shape[0], Hq + 2 * Hkv, D)
    return x[:, :Hq], x[:, Hq:Hq + Hkv], x[:, Hq + Hkv:]


@pytest.mark.parametrize("three_d", [False, True], ids=["2d", "3d"])
@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16"])
@pytest.mark.parametrize("pass_head_dim", [False, True])
def test_split_qkv_views_are_the_slices(three_d, dtype, pass_head_dim):
    rng = np.random.default_rng(1)
    qkv = _packed(rng, 5, 6, 1, 8, dtype, three_d)
    kw = {"head_dim": 8} if pass_head_dim else {}
    views = jpa.split_qkv(jnp.asarray(qkv), 6, 1, **kw)
    assert len(views) == 3
    for view, want in zip(views, _slices(qkv, 6, 1, 8)):
        got = np.asarray(materialize(view))
        assert got.shape == want.shape
        assert_bitwise(got, np.ascontiguousarray(want))


def test_materialize_of_an_array_is_the_array():
    x = np.random.default_rng(2).standard_normal((3, 2, 4)).astype(np.float32)
    assert_bitwise(np.asarray(materialize(jnp.asarray(x))), x)


# ----------------------------------------------------------------------------- general views


def _view_of(kind, x, rng):
    """A StridedView (base, shape, strides, offset) whose logical content is ``x`` [T, H, D]."""
    t, h, d = x.shape
    fill = lambda shape: rng.standard_normal(shape, dtype=np.float32).astype(x.dtype)  # noqa: E731
    if kind == "transposed":  # physical [H, T, D]
        base = np.ascontiguousarray(x.transpose(1, 0, 2))
        return base, (t, h, d), (d, t * d, 1), 0
    if kind == "offset_flat":  # 1-D buffer with junk before and after
        base = np.concatenate([fill(13), x.ravel(), fill(5)])
        return base, (t, h, d), (h * d, d, 1), 13
    if kind == "padded_tokens":  # rows longer than H*D, data starting at column 3
        base = fill((t, h * d + 7))
        base[:, 3:3 + h * d] = x.reshape(t, h * d)
        return base, (t, h, d), (h * d + 7, d, 1), 3
    if kind == "padded_heads":  # each head padded to D+5, data starting at column 2
        base = fill((t, h, d + 5))
        base[:, :, 2:2 + d] = x
        return base, (t, h, d), (h * (d + 5), d + 5, 1), 2
    if kind == "second_half_transposed":  # [2, H, T, D], data in the second half
        base = fill((2, h, t, d))
        base[1] = x.transpose(1, 0, 2)
        return base, (t, h, d), (d, t * d, 1), h * t * d
    raise ValueError(kind)


VIEW_KINDS = ["transposed", "offset_flat", "padded_tokens", "padded_heads", "second_half_transposed"]


def _as_strided(base, shape, strides, offset):
    flat = np.ascontiguousarray(base).ravel()
    it = flat.itemsize
    return np.lib.stride_tricks.as_strided(flat[offset:], shape, [s * it for s in strides])


@pytest.mark.parametrize("kind", VIEW_KINDS)
def test_materialize_general_view(kind):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 3, 8), dtype=np.float32).astype(cases.DTYPES["bf16"])
    base, shape, strides, offset = _view_of(kind, x, rng)
    view = jpa.StridedView(jnp.asarray(base), shape, strides, offset)
    got = np.asarray(materialize(view))
    assert_bitwise(got, x)
    assert_bitwise(got, np.ascontiguousarray(_as_strided(base, shape, strides, offset)))


@pytest.mark.parametrize("kind", VIEW_KINDS)
@pytest.mark.parametrize("op", ["decode", "prefill"])
def test_general_query_view_is_bitwise_dense(kind, op):
    case = cases.AttnCase(kind=op, batch=4, q_dtype="bf16", kv_dtype="bf16", sinks=True,
                          q_len_per_req=2 if op == "decode" else 1, seed=31)
    inp = cases.make_inputs(case)
    fn = jpa.paged_decode if op == "decode" else jpa.paged_prefill
    want = cases.run(fn, inp)
    base, shape, strides, offset = _view_of(kind, inp.q, np.random.default_rng(4))
    args = [cases.put(a) for a in inp.args]
    args[0] = jpa.StridedView(jnp.asarray(base), shape, strides, offset)
    got = cases.run(fn, inp, args=args)
    assert_bitwise(got[0], want[0])
    assert_bitwise(got[1], want[1], "lse")


# ----------------------------------------------------------------------------- split_qkv


@pytest.mark.parametrize("three_d", [False, True], ids=["2d", "3d"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
@pytest.mark.parametrize("op", ["decode", "prefill"])
def test_split_qkv_query_is_bitwise_dense(three_d, layout, dtype, op):
    case = cases.AttnCase(kind=op, batch=T, num_kv_heads=HKV, group=HQ // HKV, head_dim=D,
                          q_dtype=dtype, kv_dtype="bf16", kv_layout=layout, seed=32)
    inp = cases.make_inputs(case)
    n_tok = inp.num_tokens
    qkv = _packed(np.random.default_rng(5), n_tok, HQ, HKV, D, dtype, three_d)
    q_dense = np.ascontiguousarray(_slices(qkv, HQ, HKV, D)[0])
    fn = jpa.paged_decode if op == "decode" else jpa.paged_prefill
    want = cases.run(fn, inp.with_args(q=q_dense))
    args = [cases.put(a) for a in inp.args]
    args[0] = jpa.split_qkv(jnp.asarray(qkv), HQ, HKV)[0]
    got = cases.run(fn, inp, args=args)
    assert_bitwise(got[0], want[0])
    assert_bitwise(got[1], want[1], "lse")


@pytest.mark.parametrize("op", ["decode", "prefill"])
def test_views_built_inside_jit(op):
    """Views of a traced packed buffer inside jax.jit equal the eager dense result."""
    case = cases.AttnCase(kind=op, batch=T, num_kv_heads=HKV, group=HQ // HKV, head_dim=D,
                          q_dtype="bf16", kv_dtype="bf16", seed=33)
    inp = cases.make_inputs(case)
    qkv = _packed(np.random.default_rng(6), inp.num_tokens, HQ, HKV, D, "bf16", False)
    q_dense = np.ascontiguousarray(_slices(qkv, HQ, HKV, D)[0])
    fn = jpa.paged_decode if op == "decode" else jpa.paged_prefill
    want = cases.run(fn, inp.with_args(q=q_dense))
    kw = dict(inp.kwargs)

    @jax.jit
    def f(packed, *rest):
        q, _, _ = jpa.split_qkv(packed, HQ, HKV)
        return fn(q, *rest, **kw)

    got = f(jnp.asarray(qkv), *[cases.put(a) for a in inp.args[1:]])
    assert_bitwise(np.asarray(got[0]), want[0])
    assert_bitwise(np.asarray(got[1]), want[1], "lse")


# ----------------------------------------------------------------------------- append


@pytest.mark.parametrize("three_d", [False, True], ids=["2d", "3d"])
@pytest.mark.parametrize("layout,combined,kv_dtype", [
    ("NHD", False, "bf16"), ("HND", False, "f16"), ("NHD", True, "fp8"), ("HND", True, "bf16")])
def test_append_split_qkv_is_bitwise_dense(three_d, layout, combined, kv_dtype):
    ac = cases.AppendCase(num_tokens=7, num_kv_heads=HKV, head_dim=D, new_dtype="bf16",
                          kv_dtype=kv_dtype, kv_layout=layout, combined=combined,
                          k_scale=0.8 if kv_dtype == "fp8" else None, skip_fraction=0.3, seed=34)
    (kp, vp, _, _, slots), kw = cases.make_append_inputs(ac)
    qkv = _packed(np.random.default_rng(7), ac.num_tokens, HQ, HKV, D, "bf16", three_d)
    _, k_dense, v_dense = (np.ascontiguousarray(s) for s in _slices(qkv, HQ, HKV, D))
    put = cases.put
    want = jpa.append_kv(put(kp), put(vp), put(k_dense), put(v_dense), put(slots), **kw)
    _, kview, vview = jpa.split_qkv(jnp.asarray(qkv), HQ, HKV)
    got = jpa.append_kv(put(kp), put(vp), kview, vview, put(slots), **kw)
    assert_bitwise(np.asarray(got[0]), np.asarray(want[0]), "k_pages")
    if combined:
        assert got[1] is None and want[1] is None
    else:
        assert_bitwise(np.asarray(got[1]), np.asarray(want[1]), "v_pages")
    # and the dense call itself did what the semantics say
    ek, ev = cases.expected_append(ac, kp, vp, k_dense, v_dense, slots)
    assert_bitwise(np.asarray(want[0]), ek, "k_pages vs numpy")


@pytest.mark.parametrize("kind", ["transposed", "offset_flat", "padded_heads"])
def test_append_general_views_bitwise_dense(kind):
    ac = cases.AppendCase(num_tokens=5, kv_dtype="bf16", new_dtype="f32", seed=35)
    (kp, vp, k, v, slots), kw = cases.make_append_inputs(ac)
    put = cases.put
    want = jpa.append_kv(put(kp), put(vp), put(k), put(v), put(slots), **kw)
    rng = np.random.default_rng(8)
    kb = _view_of(kind, k, rng)
    vb = _view_of(kind, v, rng)
    kview = jpa.StridedView(jnp.asarray(kb[0]), *kb[1:])
    vview = jpa.StridedView(jnp.asarray(vb[0]), *vb[1:])
    got = jpa.append_kv(put(kp), put(vp), kview, vview, put(slots), **kw)
    assert_bitwise(np.asarray(got[0]), np.asarray(want[0]), "k_pages")
    assert_bitwise(np.asarray(got[1]), np.asarray(want[1]), "v_pages")


# ----------------------------------------------------------------------------- lowering

LD = 64  # a head_dim the CUDA lowering accepts
_FORBIDDEN = re.compile(r"\b(stablehlo|mhlo)\.(slice|gather|dynamic_slice|transpose|copy)\b")


def _custom_calls(text, target):
    return [ln for ln in text.splitlines() if re.search(rf"custom_call @{target}\(", ln)]


def _operands(line):
    m = re.search(r"custom_call @\w+\(([^)]*)\)", line)
    return [s.strip() for s in m.group(1).split(",")]


def _operand_types(line):
    ms = re.findall(r":\s*\(([^()]*)\)\s*->", line)
    assert ms, line
    return [s.strip() for s in re.findall(r"tensor<[^>]*>", ms[-1])]


def _int_attr(line, name):
    m = re.search(rf"\b{name} = (-?\d+) : i64", line)
    assert m, f"attribute {name} (int64 scalar) not found in: {line}"
    return int(m.group(1))


def _ints_attr(line, name):
    m = re.search(rf"\b{name} = array<i64: ([^>]*)>", line)
    if m:
        return [int(s) for s in m.group(1).split(",")]
    m = re.search(rf"\b{name} = dense<\[([^\]]*)\]> : tensor<\d+xi64>", line)
    if m:
        return [int(s) for s in m.group(1).split(",")]
    m = re.search(rf"\b{name} = dense<(-?\d+)> : tensor<(\d+)xi64>", line)  # splat
    assert m, f"attribute {name} (int64 array) not found in: {line}"
    return [int(m.group(1))] * int(m.group(2))


def _lower(f, args, platform):
    return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _check_packed_operand(text, target, packed_type, operand_index=0):
    calls = _custom_calls(text, target)
    assert len(calls) == 1, f"expected one custom_call @{target}, got {len(calls)}:\n{text}"
    line = calls[0]
    ops = _operands(line)
    assert re.fullmatch(r"%arg\d+", ops[operand_index]), (
        f"operand {operand_index} of @{target} is {ops[operand_index]}, not a function argument")
    assert _operand_types(line)[operand_index] == packed_type
    before = text[: text.index(line)]
    bad = _FORBIDDEN.findall(before)
    assert not bad, f"{bad} before the custom call:\n{text}"
    return line


def _attn_avals(op, n_tok, dtype=jnp.bfloat16, layout="NHD"):
    P, ps, B = 9, 4, n_tok
    page = (P, ps, HKV, LD) if layout == "NHD" else (P, HKV, ps, LD)
    kp = jax.ShapeDtypeStruct(page, dtype)
    bt = jax.ShapeDtypeStruct((B, 3), jnp.int32)
    sl = jax.ShapeDtypeStruct((B,), jnp.int32)
    rest = [kp, kp, bt, sl]
    if op == "prefill":
        rest.append(jax.ShapeDtypeStruct((B + 1,), jnp.int32))
    return rest


@pytest.mark.parametrize("platform", ["cuda", "cpu"])
@pytest.mark.parametrize("three_d", [False, True], ids=["2d", "3d"])
@pytest.mark.parametrize("op", ["decode", "prefill"])
def test_lowering_passes_packed_qkv(platform, three_d, op):
    n_tok = 5
    W = (HQ + 2 * HKV) * LD
    shape = (n_tok, HQ + 2 * HKV, LD) if three_d else (n_tok, W)
    packed = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    fn = jpa.paged_decode if op == "decode" else jpa.paged_prefill
    kw = {} if op == "decode" else {"max_q_len": 4}

    def f(qkv, *rest):
        q, _, _ = jpa.split_qkv(qkv, HQ, HKV)
        return fn(q, *rest, **kw)

    text = _lower(f, [packed, *_attn_avals(op, n_tok)], platform)
    ttype = "tensor<" + "x".join(map(str, shape)) + "xbf16>"
    line = _check_packed_operand(text, f"jpa_paged_{op}", ttype)
    assert _int_attr(line, "q_offset") == 0
    assert _ints_attr(line, "q_strides") == [W, LD]


@pytest.mark.parametrize("platform", ["cuda", "cpu"])
def test_lowering_general_view_attributes(platform):
    """An offset, transposed view: the attributes carry exactly its offset and strides."""
    n_tok = 5
    base = jax.ShapeDtypeStruct((2, HQ, n_tok, LD), jnp.bfloat16)
    offset = HQ * n_tok * LD + 3 * LD  # second half, starting at token 3 of head 0

    def f(b, *rest):
        q = jpa.StridedView(b, (2, HQ, LD), (LD, n_tok * LD, 1), offset)
        return jpa.paged_decode(q, *rest)

    rest = _attn_avals("decode", 2)
    text = _lower(f, [base, *rest], platform)
    line = _check_packed_operand(text, "jpa_paged_decode", f"tensor<2x{HQ}x{n_tok}x{LD}xbf16>")
    assert _int_attr(line, "q_offset") == offset
    assert _ints_attr(line, "q_strides") == [LD, n_tok * LD]


@pytest.mark.parametrize("platform", ["cuda", "cpu"])
@pytest.mark.parametrize("three_d", [False, True], ids=["2d", "3d"])
def test_lowering_append_passes_packed_kv(platform, three_d):
    n_tok, P, ps = 5, 7, 4
    W = (HQ + 2 * HKV) * LD
    shape = (n_tok, HQ + 2 * HKV, LD) if three_d else (n_tok, W)
    packed = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    kp = jax.ShapeDtypeStruct((P, ps, HKV, LD), jnp.bfloat16)
    slots = jax.ShapeDtypeStruct((n_tok,), jnp.int32)

    def f(qkv, kp, vp, slots):
        _, k, v = jpa.split_qkv(qkv, HQ, HKV)
        return jpa.append_kv(kp, vp, k, v, slots)

    text = _lower(f, [packed, kp, kp, slots], platform)
    calls = _custom_calls(text, "jpa_append_kv")
    assert len(calls) == 1, text
    line = calls[0]
    ops, types = _operands(line), _operand_types(line)
    ttype = "tensor<" + "x".join(map(str, shape)) + "xbf16>"
    packed_ops = [o for o, t in zip(ops, types) if t == ttype]
    assert packed_ops and all(re.fullmatch(r"%arg0", o) for o in packed_ops), (ops, types)
    assert not _FORBIDDEN.findall(text[: text.index(line)])
    assert _int_attr(line, "k_offset") == HQ * LD
    assert _int_attr(line, "v_offset") == (HQ + HKV) * LD
    assert _ints_attr(line, "k_strides") == [W, LD]
    assert _ints_attr(line, "v_strides") == [W, LD]
