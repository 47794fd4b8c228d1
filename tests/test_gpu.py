"""CUDA kernels against the float32 reference (skipped without a CUDA device).

Every attention call runs twice, writing into a donated output buffer filled first with NaN
and then with a finite pattern: the two results must be bitwise equal (so every element was
written, and the kernels are deterministic), NaN may appear exactly in the rows of invalid
requests, and the rest must match ``jax_paged_attn.reference`` within the dtype's relative-L2
tolerance. Covered: the CPU option grid (cases.py) moved to GPU dtypes and head_dims, large
shapes (batch 256, KV 32k, prefill 8k tokens, split-KV), head_dims 64/128/256, page sizes
1/5/16/64/128, GQA groups 1/4/5/8/16, every feature, invalid metadata, append_kv (bitwise),
strided q, and a run with XLA command buffers forced on (bitwise equal).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import cases  # noqa: E402
import device_inputs  # noqa: E402
from conftest import assert_bitwise, assert_close, gpu_device  # noqa: E402


GPU = gpu_device()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPU is None, reason="no CUDA device")]

if GPU is not None:
    import jax_paged_attn as jpa
    from jax_paged_attn import reference as ref

def _shard_spec():
    """JPA_TEST_SHARD="k/n": this process runs every n-th parametrized case starting at k,
    and its share of the unparametrized tests (scripts/gpu_check.sh runs n in parallel)."""
    spec = os.environ.get("JPA_TEST_SHARD", "0/1")
    k, n = (int(x) for x in spec.split("/"))
    return k, n


_SHARD_K, _SHARD_N = _shard_spec()


def shard(items):
    return [x for i, x in enumerate(items) if i % _SHARD_N == _SHARD_K]


def on_shard(i):
    return pytest.mark.skipif(_SHARD_K != i % _SHARD_N, reason=f"runs in shard {i % _SHARD_N}")

_DT = cases.DTYPES
_ARG_NAMES = ["q", "k_pages", "v_pages", "block_tables", "seq_lens", "cu_seqlens_q"]


def _tol(q_dtype, kv_dtype, out_dtype):
    return cases.gpu_tolerances(q_dtype, kv_dtype, out_dtype)[0]


def _on_gpu(x):
    if isinstance(x, np.ndarray):
        return jax.device_put(x, GPU)
    return x


def _split_kwargs(kwargs):
    arrays = {k: _on_gpu(v) for k, v in kwargs.items() if isinstance(v, (np.ndarray, jax.Array))}
    static = {k: v for k, v in kwargs.items() if k not in arrays}
    return arrays, static


@functools.lru_cache(maxsize=None)
def _poisoned_fn(api_fn, static_items, q_view):
    """jit(f(out_poison, lse_poison, args, array_kwargs)) with the poison buffers donated, so
    XLA places the outputs in memory whose prior contents the caller chose. `q_view`:
    (shape, strides, offset) when args[0] is the base buffer of a StridedView."""
    static = dict(static_items)

    def f(out_poison, lse_poison, args, akw):
        del out_poison, lse_poison
        if q_view is not None:
            args = [jpa.StridedView(args[0], *q_view), *args[1:]]
        res = api_fn(*args, **akw, **static)
        return res if isinstance(res, tuple) else (res,)

    return jax.jit(f, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=None)
def _ref_fn(ref_fn, static_items):
    static = dict(static_items)
    static.update(out_dtype=np.float32, return_lse=True)
    return jax.jit(lambda args, akw: ref_fn(*args, **akw, **static))


def _freeze(static):
    return tuple(sorted((k, v) for k, v in static.items()))


def run_kernel(api_fn, inputs, poison):
    """(out, lse or None) of the CUDA op with outputs poisoned by `poison`."""
    args = [_on_gpu(a) for a in inputs.args]
    akw, static = _split_kwargs(inputs.kwargs)
    T, Hq, D = inputs.q.shape
    out_dt = static.get("out_dtype") or inputs.q.dtype
    out_p = jax.device_put(np.full((T, Hq, D), poison, np.float32).astype(out_dt), GPU)
    lse_p = jax.device_put(np.full((T, Hq), poison, np.float32), GPU)
    q_view = None
    if isinstance(args[0], jpa.StridedView):
        v = args[0]
        q_view = (tuple(v.shape), tuple(v.strides), int(v.offset))
        args[0] = v.base
    res = _poisoned_fn(api_fn, _freeze(static), q_view)(out_p, lse_p, args, akw)
    out = np.asarray(res[0])
    lse = np.asarray(res[1]) if len(res) > 1 else None
    return out, lse


def run_ref(ref_fn, inputs):
    args = [_on_gpu(a) for a in inputs.args]
    if isinstance(args[0], jpa.StridedView):
        args[0] = args[0].materialize()
    akw, static = _split_kwargs(inputs.kwargs)
    static.pop("return_lse", None)
    static.pop("out_dtype", None)
    with jax.default_matmul_precision("highest"):
        out, lse = _ref_fn(ref_fn, _freeze(static))(args, akw)
    return np.asarray(out), np.asarray(lse)


def check(inputs, tol=None, expect_invalid=None):
    """Poisoned double run, bitwise determinism, reference match, NaN rows exactly where the
    semantics put them, padding rows 0 / -inf. Returns the relative L2 error of out."""
    c = inputs.case
    is_decode = c.kind == "decode"
    api_fn = jpa.paged_decode if is_decode else jpa.paged_prefill
    ref_fn = ref.paged_decode if is_decode else ref.paged_prefill
    if tol is None:
        tol = _tol(c.q_dtype, c.kv_dtype, c.out_dtype)

    out1, lse1 = run_kernel(api_fn, inputs, np.nan)
    out2, lse2 = run_kernel(api_fn, inputs, -1234.5)
    assert_bitwise(out1, out2, "out (NaN-poisoned vs pattern-poisoned run)")
    if lse1 is not None:
        assert_bitwise(lse1, lse2, "lse (NaN-poisoned vs pattern-poisoned run)")

    want_out, want_lse = run_ref(ref_fn, inputs)
    err = assert_close(out1, want_out, tol, nan_ok=True, what="out")
    if lse1 is not None:
        # f16 q with bf16 pages computes in bf16 (q rounded once), which moves the logits.
        lse_tol = cases.gpu_tolerances(c.q_dtype, c.kv_dtype)[1]
        assert_close(lse1, want_lse, lse_tol, nan_ok=True, what="lse")

    # NaN rows: exactly the invalid requests' rows (independent oracle in cases.py).
    bad = cases.invalid_requests(
        np.asarray(inputs.block_tables), np.asarray(inputs.seq_lens),
        num_pages=inputs.num_pages, page_size=inputs.page_size, num_tokens=inputs.num_tokens,
        cu_seqlens_q=None if is_decode else np.asarray(inputs.cu_seqlens_q),
        q_len_per_req=c.q_len_per_req,
        max_q_len=None if is_decode else inputs.kwargs["max_q_len"],
        window_left=c.window_left)
    if expect_invalid is not None:
        assert bad == set(expect_invalid), f"test setup: invalid {bad} != {expect_invalid}"
    nan_rows = cases.invalid_rows(inputs, bad)
    row_nan = np.isnan(out1.astype(np.float32)).reshape(out1.shape[0], -1)
    assert row_nan[nan_rows].all(), "invalid requests' rows must be all NaN"
    assert not row_nan[~nan_rows].any(), "NaN outside the invalid requests' rows"
    if not is_decode:
        pad = cases.padding_rows(inputs)
        assert (out1[pad].astype(np.float32) == 0).all(), "padding rows must be 0"
        if lse1 is not None:
            assert (lse1[pad] == -np.inf).all(), "padding rows' lse must be -inf"
    return err


# ----------------------------------------------------------------------------- the CPU grid


def _to_gpu_case(c):
    q = "bf16" if c.q_dtype == "f32" else c.q_dtype
    kv = c.kv_dtype
    if kv == "f32":
        kv = "f16" if q == "f16" else "bf16"
    d = c.head_dim if c.head_dim in (64, 128, 256) else 64
    return dataclasses.replace(c, q_dtype=q, kv_dtype=kv, head_dim=d)


def _unique(cs):
    seen, out = set(), []
    for c in cs:
        key = dataclasses.replace(c, seed=0)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


GPU_DECODE_GRID = _unique([_to_gpu_case(c) for c in cases.DECODE_GRID])
GPU_PREFILL_GRID = _unique([_to_gpu_case(c) for c in cases.PREFILL_GRID])


# ----------------------------------------------------------------------------- large inputs


def make_big(kind, **kw):
    """device_inputs.make_big (cases.py metadata, values drawn on the device) on GPU."""
    return device_inputs.make_big(kind, device=GPU, **kw)


BIG_DECODE = {
    # the performance shape (Hq=32 Hkv=8 D=128 page 16), smaller batch
    "perf_shape_b8_l4k": dict(batch=8, hkv=8, group=4, d=128, ps=16, max_kv=4096),
    "batch256_l1k": dict(batch=256, hkv=8, group=4, d=128, ps=16, max_kv=1024, min_kv=1),
    "b1_l32k_f16_page128": dict(batch=1, hkv=8, group=8, d=128, ps=128, max_kv=32768,
                                q="f16", kv="f16"),
    "b2_l16k_page1_d64": dict(batch=2, hkv=2, group=4, d=64, ps=1, max_kv=16384, q="f16",
                              kv="f16"),
    "d256_group16_page64": dict(batch=4, hkv=2, group=16, d=256, ps=64, max_kv=8192),
    "d256_group5_page5_hnd": dict(batch=6, hkv=2, group=5, d=256, ps=5, max_kv=3000,
                                  layout="HND", q="f16", kv="f16"),
    "d64_group1_combined": dict(batch=16, hkv=4, group=1, d=64, ps=16, max_kv=2048,
                                combined=True),
    "fp8_scales_d128": dict(batch=16, hkv=4, group=4, d=128, ps=16, max_kv=4096, kv="fp8",
                            k_scale=0.6, v_scale=1.7, q="bf16"),
    "fp8_f16_d256_hnd_combined": dict(batch=3, hkv=2, group=8, d=256, ps=64, max_kv=5000,
                                      kv="fp8", q="f16", layout="HND", combined=True,
                                      k_scale=0.9, v_scale=0.4),
    "spec_n4_group8_rows32": dict(batch=8, hkv=2, group=8, d=128, ps=5, max_kv=3000, n=4,
                                  window_left=700, sinks=True, logits_soft_cap=20.0),
    "spec_n3_window_sinks_d64": dict(batch=12, hkv=4, group=4, d=64, ps=16, max_kv=4000, n=3,
                                     window_left=129, sinks=True),
    "softcap_outf32_d128": dict(batch=8, hkv=4, group=4, d=128, ps=64, max_kv=6000,
                                logits_soft_cap=5.0, out_dtype="f32", q="f16", kv="f16"),
    "window0_page128": dict(batch=4, hkv=4, group=4, d=128, ps=128, max_kv=1000,
                            window_left=0),
    "scale_kscale_vscale_bf16": dict(batch=5, hkv=1, group=16, d=64, ps=16, max_kv=2500,
                                     scale=0.05, k_scale=1.5, v_scale=0.5),
}

BIG_PREFILL = {
    "perf_shape_b4_s2048_causal": dict(batch=4, hkv=8, group=4, d=128, ps=16, q="f16",
                                       kv="f16", q_lens=[2048] * 4, max_kv=2048),
    "s8192_single_causal": dict(batch=1, hkv=4, group=4, d=128, ps=16, q_lens=[8192],
                                max_kv=8192),
    # long and short requests in one launch: 8 x 8 x 64 row blocks, most of them past a short
    # request's rows (work items with nothing to do, about 30 per SM), between real ones
    "ragged_long_short_many_items": dict(batch=8, hkv=8, group=4, d=128, ps=16,
                                         q_lens=[2048, 1, 3, 2048, 0, 17, 2048, 129],
                                         max_kv=2560),
    "chunked_ctx_d256_g5_window_softcap_sinks": dict(
        batch=3, hkv=1, group=5, d=256, ps=5, q_lens=[1500, 700, 333], max_kv=6000,
        window_left=700, logits_soft_cap=30.0, sinks=True),
    "noncausal_d64_g16_page128": dict(batch=2, hkv=2, group=16, d=64, ps=128,
                                      q_lens=[600, 257], max_kv=3000, causal=False),
    "short_q_long_kv_splits": dict(batch=2, hkv=4, group=4, d=128, ps=16, q_lens=[16, 5],
                                   max_kv=16384, q="f16", kv="f16"),
    "fp8_hnd_combined_d128": dict(batch=3, hkv=2, group=4, d=128, ps=64, q_lens=[900, 1, 450],
                                  max_kv=2000, kv="fp8", k_scale=0.5, v_scale=1.3,
                                  layout="HND", combined=True),
    "padding_zero_q_slack_d64_page1": dict(batch=4, hkv=2, group=8, d=64, ps=1,
                                           q_lens=[300, 0, 129, 64], max_kv=1200,
                                           pad_front=7, pad_back=33, max_q_len_slack=50,
                                           q="f16", kv="f16"),
    "noncausal_window_group1_d256": dict(batch=2, hkv=4, group=1, d=256, ps=16,
                                         q_lens=[513, 200], max_kv=1500, causal=False,
                                         window_left=100, out_dtype="f32"),
}


@pytest.mark.parametrize("name", shard(list(BIG_DECODE)))
def test_decode_large(name):
    check(make_big("decode", seed=zlib.crc32(name.encode()) % 1000, **BIG_DECODE[name]))


@pytest.mark.parametrize("name", shard(list(BIG_PREFILL)))
def test_prefill_large(name):
    check(make_big("prefill", seed=zlib.crc32(name.encode()) % 1000, **BIG_PREFILL[name]))


# ----------------------------------------------------------------------------- invalid metadata


def _corrupt(inputs, mutate):
    bt = np.array(inputs.block_tables)
    sl = np.array(inputs.seq_lens)
    cu = None if inputs.cu_seqlens_q is None else np.array(inputs.cu_seqlens_q)
    mutate(bt, sl, cu)
    changes = dict(block_tables=bt, seq_lens=sl)
    if cu is not None:
        changes["cu_seqlens_q"] = cu
    return inputs.with_args(**changes)


def _kernel_names(inputs, api_fn):
    """The kernels one call of a fresh jit of api_fn on `inputs` launches (the profiler's
    names, space-separated), so a test can tell which launches a switch gave."""
    profiler = pytest.importorskip("jax.experimental.mosaic.gpu.profiler")
    args = [_on_gpu(a) for a in inputs.args]
    akw, static = _split_kwargs(inputs.kwargs)
    f = jax.jit(lambda *a: api_fn(*a, **akw, **static))
    _, per = profiler.measure(f, aggregate=False)(*args)
    return " ".join(name for name, _ in per)


@on_shard(0)
def test_decode_invalid_metadata_nan_rows_with_splits():
    # Long requests (split-KV active); each invalid request poisons only its own rows.
    base = make_big("decode", batch=6, hkv=4, group=4, d=128, ps=16, max_kv=8192,
                    min_kv=4000, n=2, seed=11)
    P = base.num_pages

    def mutate(bt, sl, cu):
        bt[1, 100] = P           # needed page out of range (deep inside the sequence)
        sl[2] = bt.shape[1] * 16 + 1  # seq_len past the table's capacity
        sl[3] = -5               # negative
        sl[4] = 1                # seq_len < q_len (2)
        bt[5, (int(sl[5]) - 1) // 16] = -1  # last needed page negative

    check(_corrupt(base, mutate), expect_invalid={1, 2, 3, 4, 5})


@on_shard(3)
@pytest.mark.parametrize("fused", ["1", "0"])
def test_split_decode_merged_by_its_tiles_or_a_merge_launch(fused, monkeypatch):
    """Split decode (8 requests x 4 KV heads, 6k-12k keys: many splits) merges its partial
    states in a merge launch by default, or in the last tile CTA of each (request, KV head)
    with JPA_CUDA_FUSED_MERGE=1: both pass check() with sinks, q_len 2 and two invalid
    requests (their splits' NaN lse must reach the merging CTA), and the merge kernel runs
    only when it is launched."""
    monkeypatch.setenv("JPA_CUDA_FUSED_MERGE", fused)
    _poisoned_fn.cache_clear()  # fresh executables, lowered with the switch
    try:
        base = make_big("decode", batch=8, hkv=4, group=4, d=128, ps=16, max_kv=12000,
                        min_kv=6000, n=2, sinks=True, seed=23)
        P = base.num_pages

        def mutate(bt, sl, cu):
            bt[2, 300] = P    # a page deep inside the sequence: one split sees it
            sl[5] = -1

        bad = _corrupt(base, mutate)
        check(bad, expect_invalid={2, 5})
        names = _kernel_names(bad, jpa.paged_decode)
        assert "attn_tile_kernel" in names, names
        assert ("attn_merge_kernel" in names) == (fused == "0"), names
    finally:
        _poisoned_fn.cache_clear()


@on_shard(6)
def test_mixed_split_launch_splits_long_decode_rows(monkeypatch):
    """JPA_CUDA_MIXED=1 on a mixed batch whose short requests (q_len 1-2) have contexts up to
    6k keys: the 16-row launch splits their keys with its own count (compact partials in the
    workspace's small region, merged by its tiles) while the prefill-shape launch serves the
    chunks (its own splits, if the planner picks any, go to the merge launch, which skips
    the short requests). check() with sinks and one invalid short request."""
    monkeypatch.setenv("JPA_CUDA_MIXED", "1")
    _poisoned_fn.cache_clear()  # fresh executables, lowered with the switch
    try:
        base = make_big("prefill", batch=6, hkv=4, group=4, d=128, ps=16,
                        q_lens=[1, 300, 1, 2, 1, 64], max_kv=6000, sinks=True, seed=31)

        def mutate(bt, sl, cu):
            sl[4] = 0  # seq_len < q_len

        check(_corrupt(base, mutate), expect_invalid={4})
    finally:
        _poisoned_fn.cache_clear()


@on_shard(7)
@pytest.mark.parametrize("splits", ["1", "3", "64"])
def test_forced_split_count_matches_the_reference(splits, monkeypatch):
    """JPA_CUDA_SPLITS (a benchmarking knob) forces the KV split count, within the
    launcher's cap: split decode over 6k-12k keys with sinks and a chunked prefill over up to
    9k keys pass check() at 1, 3 and 64 splits (at 64 the cap decides: one split per 256 keys
    of the block table at most), and the decode call launches the merge kernel exactly when
    it has more than one split."""
    monkeypatch.setenv("JPA_CUDA_SPLITS", splits)
    _poisoned_fn.cache_clear()  # fresh executables, lowered with the switch
    try:
        dec = make_big("decode", batch=2, hkv=4, group=4, d=128, ps=16, max_kv=12000,
                       min_kv=6000, sinks=True, seed=41)
        check(dec, expect_invalid=set())
        names = _kernel_names(dec, jpa.paged_decode)
        assert ("attn_merge_kernel" in names) == (splits != "1"), names
        pre = make_big("prefill", batch=2, hkv=2, group=4, d=128, ps=16, q_lens=[64, 300],
                       max_kv=9000, seed=42)
        check(pre, expect_invalid=set())
    finally:
        _poisoned_fn.cache_clear()


@on_shard(1)
def test_decode_invalid_page_only_outside_window_is_fine():
    base = make_big("decode", batch=3, hkv=2, group=4, d=64, ps=16, max_kv=3000, min_kv=2000,
                    seed=12, window_left=64)

    def mutate(bt, sl, cu):
        bt[1, 0] = -3  # before the window: never needed
    check(_corrupt(base, mutate), expect_invalid=set())


@on_shard(2)
def test_prefill_invalid_metadata_nan_rows():
    base = make_big("prefill", batch=6, hkv=2, group=4, d=128, ps=16,
                    q_lens=[300, 200, 100, 50, 400, 64], max_kv=3000, seed=13, pad_back=5)
    P = base.num_pages

    def mutate(bt, sl, cu):
        bt[0, 3] = P + 2         # needed page out of range
        cu[2] = cu[1] - 10       # non-monotonic: request 1 (end < start) and 2 (start < max)
        sl[4] = 10               # seq_len < q_len
    check(_corrupt(base, mutate), expect_invalid={0, 1, 2, 4})


@on_shard(3)
def test_prefill_q_len_over_max_is_invalid():
    base = make_big("prefill", batch=3, hkv=2, group=2, d=64, ps=16, q_lens=[40, 90, 20],
                    max_kv=500, seed=14)
    inputs = dataclasses.replace(base, kwargs={**base.kwargs, "max_q_len": 50})
    check(inputs, expect_invalid={1})


# ----------------------------------------------------------------------------- CPU grid on GPU


@pytest.mark.parametrize("case", shard(GPU_DECODE_GRID), ids=lambda c: c.id())
def test_decode_grid(case):
    check(cases.make_inputs(case))


@pytest.mark.parametrize("case", shard(GPU_PREFILL_GRID), ids=lambda c: c.id())
def test_prefill_grid(case):
    check(cases.make_inputs(case))


# ----------------------------------------------------------------------------- strided q


@pytest.mark.parametrize("kind", shard(["decode", "prefill"]))
def test_split_qkv_view(kind):
    hq, hkv, d = 16, 4, 128
    base = make_big(kind, batch=4, hkv=hkv, group=hq // hkv, d=d, ps=16, max_kv=1500,
                    q_lens=[100, 37, 1, 250], seed=21)
    T = base.num_tokens
    qkv = device_inputs.random_normal(jax.random.key(5), (T, (hq + 2 * hkv) * d), "bf16",
                                      device=GPU)
    qv, _, _ = jpa.split_qkv(qkv, hq, hkv)
    check(base.with_args(q=qv))


@on_shard(4)
def test_unaligned_view_offset():
    # A view whose offset is not a multiple of 8 elements: the kernels take the scalar path.
    base = make_big("decode", batch=5, hkv=2, group=4, d=64, ps=16, max_kv=700, seed=22)
    T, hq, d = base.q.shape
    flat = device_inputs.random_normal(jax.random.key(6), (T * hq * d + 3,), "bf16", device=GPU)
    qv = jpa.StridedView(flat, (T, hq, d), (hq * d, d, 1), offset=3)
    check(base.with_args(q=qv))


# ----------------------------------------------------------------------------- append


APPEND_GRID = [
    cases.AppendCase(new_dtype="bf16", kv_dtype="bf16", head_dim=128),
    cases.AppendCase(new_dtype="f16", kv_dtype="f16", head_dim=64, kv_layout="HND"),
    cases.AppendCase(new_dtype="f32", kv_dtype="bf16", head_dim=128, skip_fraction=0.3),
    cases.AppendCase(new_dtype="f32", kv_dtype="f16", head_dim=256),
    cases.AppendCase(new_dtype="f16", kv_dtype="bf16", head_dim=64),
    cases.AppendCase(new_dtype="f32", kv_dtype="fp8", head_dim=128, k_scale=0.37, v_scale=1.9),
    cases.AppendCase(new_dtype="bf16", kv_dtype="fp8", head_dim=64, kv_layout="HND"),
    cases.AppendCase(new_dtype="f16", kv_dtype="fp8", head_dim=256, combined=True,
                     k_scale=2.0, v_scale=0.5, skip_fraction=0.3),
    cases.AppendCase(new_dtype="bf16", kv_dtype="bf16", head_dim=128, combined=True,
                     kv_layout="HND"),
    cases.AppendCase(new_dtype="bf16", kv_dtype="bf16", head_dim=64, page_size=1,
                     num_pages=12, skip_fraction=0.4),
    cases.AppendCase(new_dtype="bf16", kv_dtype="f16", head_dim=128, page_size=5,
                     num_pages=4, skip_fraction=0.3, k_scale=0.5, v_scale=4.0),
    cases.AppendCase(num_kv_heads=5, head_dim=12, new_dtype="f32", kv_dtype="bf16",
                     kv_layout="HND", combined=True),  # ragged head_dim: scalar path
    cases.AppendCase(num_tokens=300, num_kv_heads=8, head_dim=128, page_size=16,
                     num_pages=40, new_dtype="bf16", kv_dtype="bf16", skip_fraction=0.1),
]
APPEND_GRID = [dataclasses.replace(c, seed=700 + i) for i, c in enumerate(APPEND_GRID)]


@functools.lru_cache(maxsize=None)
def _append_fn(static_items):
    static = dict(static_items)
    return jax.jit(lambda kp, vp, k, v, s: jpa.append_kv(kp, vp, k, v, s, **static))


@pytest.mark.parametrize("case", shard(APPEND_GRID), ids=lambda c: c.id())
def test_append_bitwise(case):
    (kp, vp, k, v, slots), kw = cases.make_append_inputs(case)
    want = cases.expected_append(case, kp, vp, k, v, slots)
    fn = _append_fn(_freeze(kw))
    got = fn(*[_on_gpu(x) if x is not None else None for x in (kp, vp, k, v, slots)])
    assert_bitwise(np.asarray(got[0]), want[0], "k_pages")
    if case.combined:
        assert got[1] is None
    else:
        assert_bitwise(np.asarray(got[1]), want[1], "v_pages")


@on_shard(5)
def test_append_strided_views_then_decode_round_trip():
    """Append new tokens from a packed qkv buffer (views, no copies), then decode them."""
    hq, hkv, d, ps, B = 8, 2, 128, 16, 4
    rng = np.random.default_rng(31)
    kv_lens = np.array([17, 40, 1, 64], np.int32)
    bt, P = cases.build_block_tables(rng, kv_lens, np.ones(B, np.int64), ps, -1, True, 2)
    k_pages = jax.device_put(jnp.zeros((P, ps, hkv, d), jnp.bfloat16) + jnp.nan, GPU)
    v_pages = jax.device_put(jnp.zeros((P, ps, hkv, d), jnp.bfloat16) + jnp.nan, GPU)
    # every token of every request arrives through append (slots from the block table)
    toks, slots = [], []
    for b in range(B):
        for j in range(int(kv_lens[b])):
            slots.append(int(bt[b, j // ps]) * ps + j % ps)
            toks.append(b)
    T = len(slots)
    qkv = device_inputs.random_normal(jax.random.key(9), (T, hq + 2 * hkv, d), "bf16",
                                      device=GPU)
    _, kview, vview = jpa.split_qkv(qkv, hq, hkv)
    slot_arr = jax.device_put(np.asarray(slots, np.int32), GPU)

    def append_from_qkv(kp, vp, qkv, slots):
        _, kv_, vv_ = jpa.split_qkv(qkv, hq, hkv)
        return jpa.append_kv(kp, vp, kv_, vv_, slots)

    kp2, vp2 = jax.jit(append_from_qkv, donate_argnums=(0, 1))(k_pages, v_pages, qkv, slot_arr)
    # the reference append on the materialized views must agree bitwise
    rk, rv = ref.append_kv(jnp.zeros((P, ps, hkv, d), jnp.bfloat16) + jnp.nan,
                           jnp.zeros((P, ps, hkv, d), jnp.bfloat16) + jnp.nan,
                           kview.materialize(), vview.materialize(), slot_arr)
    assert_bitwise(np.asarray(kp2), np.asarray(rk), "k_pages after append")
    assert_bitwise(np.asarray(vp2), np.asarray(rv), "v_pages after append")
    q = device_inputs.random_normal(jax.random.key(3), (B, hq, d), "bf16", device=GPU)
    out = jpa.paged_decode(q, kp2, vp2, jnp.asarray(bt), jnp.asarray(kv_lens))
    want = ref.paged_decode(q, rk, rv, jnp.asarray(bt), jnp.asarray(kv_lens),
                            out_dtype=np.float32)
    assert_close(np.asarray(out), np.asarray(want), 1e-2)


# ----------------------------------------------------------------------------- static misuse


@on_shard(6)
def test_unsupported_head_dim_raises_on_gpu():
    q = jax.device_put(jnp.ones((2, 4, 96), jnp.bfloat16), GPU)
    kp = jax.device_put(jnp.ones((3, 16, 2, 96), jnp.bfloat16), GPU)
    bt = jax.device_put(jnp.zeros((2, 2), jnp.int32), GPU)
    sl = jax.device_put(jnp.ones((2,), jnp.int32), GPU)
    with pytest.raises(ValueError, match="head_dim"):
        jax.jit(jpa.paged_decode)(q, kp, kp, bt, sl)


# ----------------------------------------------------------------------------- command buffers


_CMD_BUFFER_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import jax, jax.numpy as jnp
    sys.path.insert(0, sys.argv[1])
    import test_gpu as t
    res = t.command_buffer_payload()
    np.savez(sys.argv[2], **res)
""")


def command_buffer_payload():
    """A jitted step with several ops around the custom calls (decode, prefill, append)."""
    dec = make_big("decode", batch=4, hkv=2, group=4, d=128, ps=16, max_kv=3000, seed=41,
                   window_left=500, sinks=True)
    pre = make_big("prefill", batch=2, hkv=2, group=4, d=64, ps=16, q_lens=[300, 17],
                   max_kv=900, seed=42, pad_back=3)
    dargs = [_on_gpu(a) for a in dec.args]
    pargs = [_on_gpu(a) for a in pre.args]
    dkw_a, dkw_s = _split_kwargs(dec.kwargs)
    pkw_a, pkw_s = _split_kwargs(pre.kwargs)

    @jax.jit
    def step(dargs, pargs, dkw_a, pkw_a):
        q = dargs[0] * 1.5
        o1, l1 = jpa.paged_decode(q, *dargs[1:], **dkw_a, **dkw_s)
        o2, l2 = jpa.paged_prefill(*pargs, **pkw_a, **pkw_s)
        kp, vp = jpa.append_kv(dargs[1], dargs[2], o1[:, :2].astype(jnp.bfloat16),
                               o1[:, 2:4].astype(jnp.bfloat16),
                               jnp.arange(o1.shape[0], dtype=jnp.int32) * 3)
        return dict(o1=o1 + 1, l1=l1, o2=o2 * 2, l2=l2, kp=kp[:4], vp=vp[:4])

    out = step(dargs, pargs, dkw_a, pkw_a)
    return {k: np.asarray(v).view(np.uint8) for k, v in out.items()}


@on_shard(7)
def test_command_buffers_bitwise_equal(tmp_path):
    here = command_buffer_payload()
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_gpu_graph_min_graph_size=1"
                        " --xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL").strip()
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    dst = tmp_path / "cmdbuf.npz"
    proc = subprocess.run([sys.executable, "-c", _CMD_BUFFER_SCRIPT,
                           os.path.dirname(os.path.abspath(__file__)), str(dst)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    there = dict(np.load(dst))
    assert set(there) == set(here)
    for k in here:
        assert np.array_equal(here[k], there[k]), f"{k} differs with command buffers on"


# ----------------------------------------------------------------------------- stacked caches


def _stacked_case(seed, layers=4, batch=6, hkv=4, group=4, d=128, ps=16):
    """A [layers, P, ps, Hkv, D] bf16 stack (fresh random layers), tables and lengths."""
    rng = np.random.default_rng(seed)
    kv_lens = rng.integers(1, 600, batch)
    kv_lens[0] = 1
    bt, P = cases.build_block_tables(rng, kv_lens, np.ones(batch, np.int64), ps, -1, True, 3)
    shape = (layers, P, ps, hkv, d)
    ks = cases._rand(rng, shape, _DT["bf16"])
    vs = cases._rand(rng, shape, _DT["bf16"])
    q = cases._rand(rng, (layers, batch, hkv * group, d), _DT["bf16"])
    return q, ks, vs, bt, kv_lens.astype(np.int32)


@on_shard(0)
def test_stacked_cache_decode_in_a_jitted_layer_scan():
    """layer= from a lax.scan counter, inside jit, on the GPU: each layer's output equals the
    call on that layer's own cache (bf16 tolerance; the same kernel reads the same pages) and
    the reference; a runtime layer out of range gives NaN rows."""
    q, ks, vs, bt, sl = _stacked_case(seed=61)
    L = ks.shape[0]
    qg, kg, vg, btg, slg = (_on_gpu(a) for a in (q, ks, vs, bt, sl))

    @jax.jit
    def step(q, ks, vs, bt, sl):
        def body(carry, xs):
            i, qi = xs
            return carry, jpa.paged_decode(qi, ks, vs, bt, sl, layer=i)
        return jax.lax.scan(body, 0, (jnp.arange(L, dtype=jnp.int32), q))[1]

    got = np.asarray(step(qg, kg, vg, btg, slg))
    for i in range(L):
        want = np.asarray(jpa.paged_decode(qg[i], _on_gpu(ks[i]), _on_gpu(vs[i]), btg, slg))
        assert_close(got[i], want.astype(np.float32), 1e-2)
        r = ref.paged_decode(qg[i], _on_gpu(ks[i]), _on_gpu(vs[i]), btg, slg,
                             out_dtype=np.float32)
        assert_close(got[i], np.asarray(r), 1e-2)
    bad = jax.jit(lambda q, k, v, bt, sl, l: jpa.paged_decode(q, k, v, bt, sl, layer=l))(
        qg[0], kg, vg, btg, slg, jnp.int32(L))
    assert np.isnan(np.asarray(bad, np.float32)).all()


@on_shard(1)
def test_stacked_cache_append_in_a_donated_layer_scan():
    """append_kv(layer=i) in a scan carrying the donated stack: each layer holds exactly its
    own tokens (bitwise, as the numpy semantics), on the GPU's append path for stacks."""
    _, ks, vs, bt, sl = _stacked_case(seed=62)
    L, P, ps, hkv, d = ks.shape
    rng = np.random.default_rng(63)
    T = 24
    slots = rng.permutation(P * ps)[:T].astype(np.int32)
    new_k = cases._rand(rng, (L, T, hkv, d), _DT["bf16"])
    new_v = cases._rand(rng, (L, T, hkv, d), _DT["bf16"])

    def loop(ks, vs, new_k, new_v, slots):
        def body(carry, xs):
            i, k, v = xs
            return jpa.append_kv(*carry, k, v, slots, layer=i), None
        return jax.lax.scan(body, (ks, vs), (jnp.arange(L, dtype=jnp.int32), new_k, new_v))[0]

    gk, gv = jax.jit(loop, donate_argnums=(0, 1))(*(_on_gpu(a) for a in
                                                   (ks, vs, new_k, new_v, slots)))
    case = cases.AppendCase(num_tokens=T, num_kv_heads=hkv, head_dim=d, page_size=ps,
                            num_pages=P, new_dtype="bf16", kv_dtype="bf16")
    for i in range(L):
        wk, wv = cases.expected_append(case, ks[i], vs[i], new_k[i], new_v[i], slots)
        assert_bitwise(np.asarray(gk[i]), wk, f"k pages of layer {i}")
        assert_bitwise(np.asarray(gv[i]), wv, f"v pages of layer {i}")


# ----------------------------------------------------------------------------- ragged / interleaved


@pytest.mark.parametrize("opts,dtype", shard([
    (dict(sm_scale=0.088), "bf16"),
    (dict(sm_scale=0.1, sliding_window=37, soft_cap=30.0), "f16"),
    (dict(sm_scale=0.09, k_scale=0.5, v_scale=1.5), "bf16"),
]), ids=lambda x: "-".join(x) if isinstance(x, dict) else x)
@pytest.mark.parametrize("switches", [{}, {"JPA_CUDA_MIXED": "1"},
                                      {"JPA_CUDA_MIXED": "1", "JPA_CUDA_FAMILY": "sm90"}],
                         ids=["default", "mixed-split", "mixed-split-sm90"])
def test_ragged_interleaved_pages(opts, dtype, switches, monkeypatch):
    """The interleaved page layout (K head h at combined head 2h, V at 2h+1) on the CUDA
    kernels, a mixed batch of decode and prefill rows, against the float32 reference; also
    with the launcher's mixed-batch split launch, and that with the sm90 family."""
    from test_ragged import _args, _inputs
    for k, v in switches.items():
        monkeypatch.setenv(k, v)
    x = _inputs(zlib.crc32(repr((opts, dtype)).encode()), num_seqs=11, max_seqs=13, hkv=4,
                group=4, d=128, ps=16, dtype=dtype, max_q=70, max_ctx=300)
    args = [_on_gpu(np.asarray(a)) for a in _args(x)]
    got = np.asarray(jax.jit(functools.partial(jpa.ragged_paged_attention, max_q_len=70,
                                               **opts))(*args))  # a fresh executable
    sw = opts.get("sliding_window")
    want = ref.paged_prefill(
        args[0], args[1], None, args[3], jnp.where(jnp.arange(13) < 11, args[2], 0),
        jnp.minimum(args[4], args[4][11]), max_q_len=70, kv_layout="interleaved",
        scale=opts["sm_scale"], window_left=-1 if sw is None else sw - 1,
        logits_soft_cap=opts.get("soft_cap"), k_scale=opts.get("k_scale"),
        v_scale=opts.get("v_scale"), out_dtype=jnp.float32)
    n = int(x["cu_q_lens"][11])
    assert not np.isnan(got).any()
    assert_close(got[:n].astype(np.float32), np.asarray(want)[:n], _tol(dtype, dtype, None))
    assert np.all(got[n:].astype(np.float32) == 0)


@on_shard(7)
def test_ragged_append_interleaved_bitwise():
    rng = np.random.default_rng(17)
    P, ps, hkv, d, T = 9, 16, 4, 128, 60
    pages = cases._rand(rng, (P, ps, 2 * hkv, d), cases.DTYPES["bf16"])
    k = cases._rand(rng, (T, hkv, d), cases.DTYPES["bf16"])
    v = cases._rand(rng, (T, hkv, d), cases.DTYPES["bf16"])
    slots = rng.permutation(P * ps)[:T].astype(np.int32)
    slots[::7] = -1
    got = jax.jit(jpa.ragged_append_kv)(*(_on_gpu(a) for a in (pages, k, v, slots)))
    want = ref.append_kv(jnp.asarray(pages), None, jnp.asarray(k), jnp.asarray(v),
                         jnp.asarray(slots), kv_layout="interleaved")[0]
    assert_bitwise(np.asarray(got), np.asarray(want), "interleaved pages after append")


# ----------------------------------------------------------------------------- kernel families


@on_shard(4)
@pytest.mark.parametrize("family,kv", [("sm80", "bf16"), ("sm90", "bf16"), ("sm80", "fp8"),
                                       ("sm90", "fp8")])
def test_family_switch_runs_that_familys_kernel(family, kv, monkeypatch):
    """JPA_CUDA_FAMILY picks the prefill kernel family (read when the call is lowered, so
    the jit below is a fresh one): the profile names the family's kernel, and both match the
    reference, with bf16 pages and with fp8 pages (widened to f16 by the sm90 loader)."""
    profiler = pytest.importorskip("jax.experimental.mosaic.gpu.profiler")
    if family == "sm90":
        if "sm90" not in jpa._registry.cuda_kernel_families():
            pytest.skip("this build has no sm90 kernels")
        if GPU.compute_capability != "9.0":
            pytest.skip("the sm90 family needs compute capability 9.0")
    monkeypatch.setenv("JPA_CUDA_FAMILY", family)
    case = cases.AttnCase(kind="prefill", batch=3, num_kv_heads=2, group=4, head_dim=128,
                          page_size=16, q_dtype="bf16", kv_dtype=kv, max_kv_len=300,
                          seed=4242)
    inputs = cases.make_inputs(case)
    args = [_on_gpu(a) for a in inputs.args]
    akw, static = _split_kwargs(inputs.kwargs)
    f = jax.jit(lambda *a: jpa.paged_prefill(*a, **akw, **static))  # a fresh executable
    got = f(*args)  # (out, lse): the case asks for the lse
    out = np.asarray(got[0] if isinstance(got, (tuple, list)) else got)
    _, per = profiler.measure(f, aggregate=False)(*args)
    names = " ".join(name for name, _ in per)
    want = "prefill_wgmma_kernel" if family == "sm90" else "attn_tile_kernel"
    assert want in names, names
    want_out, _ = run_ref(ref.paged_prefill, inputs)
    assert_close(out.astype(np.float32), want_out, 1e-2)


@on_shard(5)
def test_sm90_wgmma_layouts(tmp_path):
    """The sm90 family's descriptors, swizzle and register layouts on the GPU itself
    (tests/cuda/sm90_wgmma_check.cu: S = Q K^T and O = P V of one warpgroup against a
    double-precision product; swapped V offsets must fail)."""
    import shutil
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc")
    if GPU.compute_capability != "9.0":
        pytest.skip("wgmma needs compute capability 9.0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    exe = tmp_path / "sm90_wgmma_check"
    subprocess.run([nvcc, "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-I", root,
                    os.path.join(root, "tests", "cuda", "sm90_wgmma_check.cu"), "-o", str(exe)],
                   check=True, capture_output=True, text=True, timeout=300)
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "sm90_wgmma_check: OK" in res.stdout, res.stdout + res.stderr
