"""`ragged_paged_attention` against JAX's own pure-jnp reference of the Pallas TPU kernel, on
random inputs; `num_seqs` as a runtime bound; the interleaved pages reach the custom call
with no copy; `ragged_append_kv` writes the interleaved layout."""

from __future__ import annotations

import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cases
import jax_paged_attn as jpa
from conftest import assert_close
from test_views import _custom_calls, _int_attr, _operands

pytestmark = pytest.mark.usefixtures("on_cpu")


def _tpu_reference():
    mod = pytest.importorskip(
        "jax.experimental.pallas.ops.tpu.ragged_paged_attention.kernel",
        reason="JAX's TPU ragged_paged_attention module does not import here")
    return mod.ref_ragged_paged_attention


def _inputs(seed, *, num_seqs, max_seqs, hkv, group, d, ps, dtype, decode_share=0.5,
            max_q=9, max_ctx=30, pad_rows=3):
    rng = np.random.default_rng(seed)
    q_lens = np.where(rng.random(max_seqs) < decode_share, 1, rng.integers(1, max_q + 1,
                                                                          max_seqs))
    kv_lens = q_lens + rng.integers(0, max_ctx + 1, max_seqs)
    pages_per_seq = -(-int(kv_lens.max()) // ps) + 1
    num_pages = max_seqs * pages_per_seq + 2
    perm = rng.permutation(num_pages)
    page_indices = perm[:max_seqs * pages_per_seq].reshape(max_seqs, pages_per_seq)
    cu = np.concatenate([[0], np.cumsum(q_lens)])
    T = int(cu[-1]) + pad_rows
    dt = cases.DTYPES[dtype]
    kv_pages = cases._rand(rng, (num_pages, ps, 2 * hkv, d), dt)
    q = cases._rand(rng, (T, hkv * group, d), dt)
    return dict(q=q, kv_pages=kv_pages, kv_lens=kv_lens.astype(np.int32),
                page_indices=page_indices.astype(np.int32), cu_q_lens=cu.astype(np.int32),
                num_seqs=np.asarray([num_seqs], np.int32))


def _args(x):
    return [jnp.asarray(x[k]) for k in ("q", "kv_pages", "kv_lens", "page_indices",
                                        "cu_q_lens", "num_seqs")]


OPTIONS = [
    dict(),
    dict(sm_scale=0.25),
    dict(sm_scale=0.3, sliding_window=4),
    dict(sm_scale=0.5, soft_cap=3.0),
    dict(sliding_window=1, soft_cap=1.5, mask_value=-1e30),
    dict(sm_scale=0.2, k_scale=0.5, v_scale=1.75),
    dict(sm_scale=0.35, sliding_window=6, k_scale=1.5, v_scale=0.5),
]


SHAPES = [(2, 2, 16, 4), (1, 4, 8, 5), (3, 1, 32, 1)]   # (Hkv, group, D, page_size)


# JAX's reference is an eager Python loop (slow), so each option runs once: the head/page
# shapes and the two dtypes rotate through the options.
@pytest.mark.parametrize("opts,shape,dtype", [
    (o, SHAPES[i % len(SHAPES)], ("f32", "bf16")[i % 2]) for i, o in enumerate(OPTIONS)],
    ids=lambda x: (("-".join(x) or "default") if isinstance(x, dict) else
                   "hkv{}-g{}-d{}-ps{}".format(*x) if isinstance(x, tuple) else x))
def test_matches_jax_tpu_reference(opts, shape, dtype):
    ref = _tpu_reference()
    hkv, group, d, ps = shape
    x = _inputs(zlib.crc32(repr((dtype, shape, opts)).encode()), num_seqs=5, max_seqs=7, hkv=hkv,
                group=group, d=d, ps=ps, dtype=dtype)
    args = _args(x)
    want = np.asarray(ref(*args, **opts).astype(jnp.float32))
    got = np.asarray(jpa.ragged_paged_attention(*args, **opts))
    assert got.shape == x["q"].shape and got.dtype == x["q"].dtype
    n = int(x["cu_q_lens"][5])
    assert want.shape[0] == n
    # JAX's reference rounds scaled K/V and the probabilities to the input dtype; for bf16
    # inputs it is itself a bf16 computation, so compare at the bf16 tolerance.
    assert_close(got[:n], want, cases.tolerance(got.dtype))
    assert np.all(got[n:].astype(np.float32) == 0), "rows past cu_q_lens[num_seqs]"
    # And exactly our own float32 reference semantics through paged_prefill.
    sw = opts.get("sliding_window")
    mine = jpa.reference.paged_prefill(
        *args[:1], args[1], None, args[3], jnp.where(jnp.arange(7) < 5, args[2], 0),
        jnp.minimum(args[4], args[4][5]), max_q_len=args[0].shape[0], kv_layout="interleaved",
        scale=opts.get("sm_scale", 1.0), window_left=-1 if sw is None else sw - 1,
        logits_soft_cap=opts.get("soft_cap"), k_scale=opts.get("k_scale"),
        v_scale=opts.get("v_scale"), out_dtype=jnp.float32)
    assert_close(got, np.asarray(mine))


def test_sequences_past_num_seqs_are_never_read():
    x = _inputs(5, num_seqs=3, max_seqs=6, hkv=2, group=2, d=16, ps=4, dtype="f32")
    args = _args(x)
    base = np.asarray(jpa.ragged_paged_attention(*args))
    # Garbage behind every inactive sequence: NaN pages, out-of-range page indices, absurd
    # lengths. Nothing of it may show.
    kv = x["kv_pages"].copy()
    pi = x["page_indices"].copy()
    active_pages = set(pi[:3].ravel().tolist())
    for p in range(kv.shape[0]):
        if p not in active_pages:
            kv[p] = np.nan
    pi[3:] = -7
    kv_lens = x["kv_lens"].copy()
    kv_lens[3:] = 10**6
    got = np.asarray(jpa.ragged_paged_attention(
        jnp.asarray(x["q"]), jnp.asarray(kv), jnp.asarray(kv_lens), jnp.asarray(pi),
        args[4], args[5]))
    assert not np.isnan(got).any()
    np.testing.assert_array_equal(got, base)
    # num_seqs is a runtime value: one compiled function serves every count.
    f = jax.jit(jpa.ragged_paged_attention)
    for n in (0, 1, 6):
        out = np.asarray(f(*args[:5], jnp.asarray([n], jnp.int32)))
        end = int(x["cu_q_lens"][n])
        assert np.all(out[end:] == 0) and not np.isnan(out).any()
    assert f._cache_size() == 1


def test_interleaved_pages_reach_the_kernel_without_a_copy():
    x = _inputs(6, num_seqs=4, max_seqs=4, hkv=2, group=2, d=64, ps=4, dtype="bf16")
    args = _args(x)
    text = jax.jit(jpa.ragged_paged_attention).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
    calls = _custom_calls(text, "jpa_paged_prefill")
    assert len(calls) == 1, text
    line = calls[0]
    assert re.fullmatch(r"%arg1", _operands(line)[1]), _operands(line)
    assert _int_attr(line, "kv_layout") == 2 and _int_attr(line, "kv_combined") == 1
    # Nothing touches the pages before the call (the metadata is rewritten for num_seqs,
    # which is a few small ops on [S] arrays).
    body = text.index("\n", text.index("func.func public @main"))
    before = text[body: text.index(line)]
    assert not re.search(r"%arg1\b", before), before


@pytest.mark.parametrize("dtype", ["f32", "bf16", "fp8"])
def test_ragged_append_writes_k_at_even_and_v_at_odd_heads(dtype):
    rng = np.random.default_rng(7)
    P, ps, hkv, d, T = 5, 4, 2, 8, 9
    dt = cases.DTYPES[dtype]
    pages = cases._rand(rng, (P, ps, 2 * hkv, d), dt)
    k = cases._rand(rng, (T, hkv, d), np.float32)
    v = cases._rand(rng, (T, hkv, d), np.float32)
    slots = rng.permutation(P * ps)[:T].astype(np.int32)
    slots[2] = -1
    scales = dict(k_scale=0.5, v_scale=2.0) if dtype == "fp8" else {}
    got = np.asarray(jpa.ragged_append_kv(jnp.asarray(pages), jnp.asarray(k), jnp.asarray(v),
                                          jnp.asarray(slots), **scales))
    want = pages.copy()
    for t, s in enumerate(slots):
        if s < 0:
            continue
        kk = np.clip(k[t] / scales.get("k_scale", 1.0), -448, 448)
        vv = np.clip(v[t] / scales.get("v_scale", 1.0), -448, 448)
        want[s // ps, s % ps, 0::2] = kk.astype(dt)
        want[s // ps, s % ps, 1::2] = vv.astype(dt)
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
    ref = np.asarray(jpa.reference.append_kv(jnp.asarray(pages), None, jnp.asarray(k),
                                             jnp.asarray(v), jnp.asarray(slots),
                                             kv_layout="interleaved", **scales)[0])
    np.testing.assert_array_equal(ref.view(np.uint8), want.view(np.uint8))


def test_misuse_names_the_argument():
    x = _inputs(8, num_seqs=2, max_seqs=2, hkv=1, group=2, d=8, ps=4, dtype="f32")
    args = _args(x)
    with pytest.raises(TypeError, match="num_seqs"):
        jpa.ragged_paged_attention(*args[:5], jnp.asarray(2, jnp.int32))
    with pytest.raises(ValueError, match="sliding_window"):
        jpa.ragged_paged_attention(*args, sliding_window=0)
    with pytest.raises(ValueError, match="soft_cap"):
        jpa.ragged_paged_attention(*args, soft_cap=-1.0)
    odd = jnp.zeros(x["kv_pages"].shape[:2] + (3, 8), jnp.float32)
    with pytest.raises(ValueError, match="even number"):
        jpa.ragged_paged_attention(args[0], odd, *args[2:])
    with pytest.raises(ValueError, match="v_pages=None"):
        jpa.paged_prefill(args[0], args[1], args[1], args[3], args[2], args[4], max_q_len=4,
                          kv_layout="interleaved")
