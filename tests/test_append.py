"""append_kv: exact writes (rounding, fp8 saturation, scales), skipped slots, every layout,
a round trip through decode, and an in-place update under donation."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cases
import jax_paged_attn as jpa
from cases import AppendCase
from conftest import assert_bitwise, assert_close
from jax_paged_attn import reference as ref

pytestmark = pytest.mark.usefixtures("on_cpu")

put = cases.put

APPEND_GRID = [
    AppendCase(),
    AppendCase(new_dtype="bf16", kv_dtype="bf16"),
    AppendCase(new_dtype="f16", kv_dtype="f16"),
    AppendCase(new_dtype="f32", kv_dtype="bf16"),  # rounding to nearest even
    AppendCase(new_dtype="f32", kv_dtype="f16"),
    AppendCase(new_dtype="bf16", kv_dtype="f32"),
    AppendCase(new_dtype="f16", kv_dtype="bf16"),
    AppendCase(new_dtype="f32", kv_dtype="fp8", k_scale=0.37, v_scale=1.9),
    AppendCase(new_dtype="bf16", kv_dtype="fp8"),
    AppendCase(new_dtype="f16", kv_dtype="fp8", k_scale=2.0, v_scale=0.5),
    AppendCase(kv_dtype="bf16", kv_layout="HND", skip_fraction=0.3),
    AppendCase(new_dtype="bf16", kv_dtype="bf16", combined=True),
    AppendCase(new_dtype="f32", kv_dtype="fp8", combined=True, kv_layout="HND", k_scale=0.8, v_scale=1.1),
    AppendCase(page_size=1, num_pages=12, skip_fraction=0.3),
    AppendCase(page_size=5, num_pages=4, kv_layout="HND", kv_dtype="f16", skip_fraction=0.3),
    AppendCase(skip_fraction=0.6, num_tokens=12),
    AppendCase(new_dtype="bf16", kv_dtype="bf16", k_scale=0.5, v_scale=4.0),
    AppendCase(new_dtype="f32", kv_dtype="bf16", k_scale=0.3, v_scale=1.7),
    AppendCase(num_tokens=24, num_pages=6, page_size=4),  # fills the whole cache
    AppendCase(num_kv_heads=5, head_dim=8, kv_dtype="bf16", kv_layout="HND", combined=True),
]
APPEND_GRID = [dataclasses.replace(c, seed=100 + i) for i, c in enumerate(APPEND_GRID)]


def _run_append(fn, pages_k, pages_v, k, v, slots, **kw):
    out = fn(put(pages_k), put(pages_v), put(k), put(v), put(slots), **kw)
    return tuple(None if o is None else np.asarray(o) for o in out)


@pytest.mark.parametrize("case", APPEND_GRID, ids=lambda c: c.id())
def test_append_matches_semantics_and_reference(case):
    (kp, vp, k, v, slots), kw = cases.make_append_inputs(case)
    got = _run_append(jpa.append_kv, kp, vp, k, v, slots, **kw)
    want = cases.expected_append(case, kp, vp, k, v, slots)
    r = _run_append(ref.append_kv, kp, vp, k, v, slots, **kw)
    assert got[0].shape == kp.shape and got[0].dtype == kp.dtype
    assert_bitwise(got[0], want[0], "k_pages vs numpy")
    assert_bitwise(got[0], r[0], "k_pages vs reference")
    if case.combined:
        assert got[1] is None and r[1] is None
    else:
        assert_bitwise(got[1], want[1], "v_pages vs numpy")
        assert_bitwise(got[1], r[1], "v_pages vs reference")
    # something was written
    assert not np.array_equal(got[0].view(np.uint8), kp.view(np.uint8))


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_skipped_slots_leave_everything_else_unchanged(layout):
    case = AppendCase(num_tokens=10, num_pages=5, kv_dtype="bf16", kv_layout=layout,
                      skip_fraction=0.5, seed=7)
    (kp, vp, k, v, slots), kw = cases.make_append_inputs(case)
    assert (slots < 0).any() and (slots >= 0).any()
    gk, gv = _run_append(jpa.append_kv, kp, vp, k, v, slots, **kw)
    gk, gv = cases.from_layout(gk, layout), cases.from_layout(gv, layout)
    ok, ov = cases.from_layout(kp, layout), cases.from_layout(vp, layout)
    P, ps = case.num_pages, case.page_size
    written = np.zeros((P, ps), bool)
    for t, s in enumerate(slots):
        if 0 <= s < P * ps:
            written[s // ps, s % ps] = True
            assert_bitwise(gk[s // ps, s % ps], k[t].astype(gk.dtype), f"token {t}")
            assert_bitwise(gv[s // ps, s % ps], v[t].astype(gv.dtype), f"token {t}")
    assert_bitwise(gk[~written], ok[~written], "untouched K slots")
    assert_bitwise(gv[~written], ov[~written], "untouched V slots")


def test_all_slots_skipped_is_identity():
    case = AppendCase(kv_dtype="fp8", new_dtype="f32", k_scale=0.5, seed=8)
    (kp, vp, k, v, _), kw = cases.make_append_inputs(case)
    P, ps = case.num_pages, case.page_size
    slots = np.array([-1, P * ps, -(2**31), 2**31 - 1, P * ps + 1, -2, -3, P * ps * 2, -9], np.int32)
    gk, gv = _run_append(jpa.append_kv, kp, vp, k, v, slots, **kw)
    assert_bitwise(gk, kp)
    assert_bitwise(gv, vp)


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_fp8_saturates_instead_of_nan(scale):
    case = AppendCase(new_dtype="f32", kv_dtype="fp8", k_scale=scale, v_scale=scale, seed=9)
    (kp, vp, k, v, slots), kw = cases.make_append_inputs(case)
    k = k * np.float32(1e3)  # far beyond 448 * scale
    v = np.where(np.arange(v.size).reshape(v.shape) % 2 == 0, np.float32(1e30), np.float32(-1e30))
    gk, gv = _run_append(jpa.append_kv, kp, vp, k, v, slots, **kw)
    assert not np.isnan(gk.astype(np.float32)).any() and not np.isnan(gv.astype(np.float32)).any()
    written = cases.from_layout(gv, "NHD")[slots // case.page_size, slots % case.page_size]
    assert set(np.unique(np.abs(written.astype(np.float32)))) == {448.0}
    rk, rv = _run_append(ref.append_kv, kp, vp, k, v, slots, **kw)
    assert_bitwise(gk, rk)
    assert_bitwise(gv, rv)


def test_traced_scales_equal_python_scales():
    case = AppendCase(new_dtype="f32", kv_dtype="fp8", k_scale=0.6, v_scale=1.3, seed=10)
    (kp, vp, k, v, slots), kw = cases.make_append_inputs(case)
    a = _run_append(jpa.append_kv, kp, vp, k, v, slots, **kw)
    b = _run_append(jpa.append_kv, kp, vp, k, v, slots,
                    k_scale=jnp.float32(0.6), v_scale=jnp.asarray(1.3, jnp.float32))
    assert_bitwise(a[0], b[0])
    assert_bitwise(a[1], b[1])


def test_without_donation_the_input_cache_is_untouched():
    case = AppendCase(kv_dtype="bf16", new_dtype="bf16", seed=11)
    (kp, vp, k, v, slots), kw = cases.make_append_inputs(case)
    kpj, vpj = put(kp), put(vp)
    out = jax.jit(jpa.append_kv)(kpj, vpj, put(k), put(v), put(slots))
    assert not np.array_equal(np.asarray(out[0]), kp)
    assert_bitwise(np.asarray(kpj), kp)
    assert_bitwise(np.asarray(vpj), vp)


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("layout,combined,kv_dtype,n", [
    ("NHD", False, "f32", 1), ("HND", False, "bf16", 2), ("NHD", True, "fp8", 3),
    ("HND", True, "f16", 1), ("NHD", False, "fp8", 2)])
def test_append_then_decode_round_trip(layout, combined, kv_dtype, n):
    """Write each request's newest n tokens with append_kv, then decode over the whole cache."""
    sc = dict(k_scale=0.5, v_scale=0.9) if kv_dtype == "fp8" else {}
    case = cases.AttnCase(q_len_per_req=n, kv_layout=layout, combined=combined, kv_dtype=kv_dtype,
                          q_dtype="bf16" if kv_dtype != "f32" else "f32", page_size=3,
                          garbage_tables=False, seed=40 + n, **sc)
    inp = cases.make_inputs(case)
    B, ps = case.batch, case.page_size
    rng = np.random.default_rng(50)
    new_dt = cases.DTYPES["f32"]
    k_new = rng.standard_normal((B * n, case.num_kv_heads, case.head_dim), dtype=np.float32).astype(new_dt)
    v_new = rng.standard_normal((B * n, case.num_kv_heads, case.head_dim), dtype=np.float32).astype(new_dt)
    slots = np.empty(B * n, np.int32)
    for b in range(B):
        L = int(inp.kv_lens[b])
        for i in range(n):
            pos = L - n + i
            slots[b * n + i] = inp.block_tables[b, pos // ps] * ps + pos % ps
    akw = {k: v for k, v in inp.kwargs.items() if k in ("kv_layout", "k_scale", "v_scale")}
    kp, vp = inp.args[1], inp.args[2]
    new_k, new_v = _run_append(jpa.append_kv, kp, vp, k_new, v_new, slots, **akw)
    r_k, r_v = _run_append(ref.append_kv, kp, vp, k_new, v_new, slots, **akw)
    assert_bitwise(new_k, r_k)
    appended = inp.with_args(k_pages=new_k, v_pages=new_v)
    out, lse = cases.run(jpa.paged_decode, appended)
    r_out, r_lse = cases.run_reference(ref.paged_decode, inp.with_args(k_pages=r_k, v_pages=r_v))
    assert_close(out, r_out)
    assert_close(lse, r_lse, cases.LSE_TOLERANCE, what="lse")
    # the new tokens matter: decoding the old cache gives something else
    old, _ = cases.run(jpa.paged_decode, inp)
    assert not np.allclose(out.astype(np.float32), old.astype(np.float32))


def test_scan_of_appends_equals_sequential_appends():
    """A decode loop: lax.scan appends one token per step into a carried, donated cache."""
    case = AppendCase(num_tokens=6, kv_dtype="bf16", new_dtype="f32", num_pages=4, seed=12)
    (kp, vp, k, v, slots), kw = cases.make_append_inputs(case)

    def loop(kp, vp, k, v, slots):
        def body(carry, x):
            kk, vv = carry
            kt, vt, st = x
            return jpa.append_kv(kk, vv, kt[None], vt[None], st[None]), None
        (kp, vp), _ = jax.lax.scan(body, (kp, vp), (k, v, slots))
        return kp, vp

    got = jax.jit(loop, donate_argnums=(0, 1))(put(kp), put(vp), put(k), put(v), put(slots))
    want = (kp, vp)
    for t in range(case.num_tokens):
        want = _run_append(jpa.append_kv, want[0], want[1], k[t:t + 1], v[t:t + 1], slots[t:t + 1])
    assert_bitwise(np.asarray(got[0]), want[0])
    assert_bitwise(np.asarray(got[1]), want[1])


# ----------------------------------------------------------------------------- donation


def _braced(text, key):
    """The balanced {...} value following ``key`` in ``text`` ('' when absent)."""
    i = text.find(key)
    if i < 0:
        return ""
    i = text.index("{", i)
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j + 1]
    return ""


def _aliases(compiled_text):
    """{output index: parameter index} from the HLO module's input_output_alias."""
    header = compiled_text.split("\n", 1)[0]
    pairs = re.findall(r"\{(\d*)\}:\s*\((\d+),\s*\{\},\s*(?:may|must)-alias\)",
                       _braced(header, "input_output_alias="))
    return {int(o) if o else 0: int(p) for o, p in pairs}


@pytest.mark.parametrize("combined", [False, True])
def test_donation_updates_the_cache_in_place(combined):
    case = AppendCase(num_pages=64, page_size=16, num_tokens=8, kv_dtype="bf16", new_dtype="bf16",
                      combined=combined, seed=13)
    (kp, vp, k, v, slots), kw = cases.make_append_inputs(case)
    cache_bytes = kp.nbytes + (0 if combined else vp.nbytes)
    donate = (0,) if combined else (0, 1)
    args = (put(kp), None if combined else put(vp), put(k), put(v), put(slots))

    def f(kp, vp, k, v, slots):
        kp2, vp2 = jpa.append_kv(kp, vp, k, v, slots)
        return kp2 if combined else (kp2, vp2)

    compiled = jax.jit(f, donate_argnums=donate).lower(*args).compile()
    text = compiled.as_text()
    aliases = _aliases(text)
    if combined:
        assert 0 in aliases.values(), text[:400]
    else:
        assert aliases.get(0) == 0 and aliases.get(1) == 1, text[:400]
    mem = compiled.memory_analysis()
    assert mem.alias_size_in_bytes >= cache_bytes
    assert mem.temp_size_in_bytes < kp.nbytes // 2, mem
    # the custom call itself writes into its operands (no copy of the cache inside)
    assert re.search(r"output_to_operand_aliasing=\{\{0\}:\s*\(0,", text), "custom call not aliased"
    # without donation nothing aliases (sanity of the check above)
    plain = jax.jit(f).lower(*args).compile()
    assert plain.memory_analysis().alias_size_in_bytes == 0

    out = compiled(*args)
    assert args[0].is_deleted()
    want = cases.expected_append(case, kp, vp, k, v, slots)
    assert_bitwise(np.asarray(out if combined else out[0]), want[0])
