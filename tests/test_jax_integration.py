"""JAX integration: jit without retracing, vmap (a batching rule, not a loop), export round
trip, scan over layers, checkify, and a clear refusal to differentiate.
(shard_map over heads: tests/test_sharding.py.)"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import cases
import jax_paged_attn as jpa
from conftest import assert_bitwise, assert_close
from jax_paged_attn import reference as ref

pytestmark = pytest.mark.usefixtures("on_cpu")

put = cases.put


def _metadata_variants(inp, count, seed):
    """Other valid (block_tables, seq_lens) with the same shapes: shuffled pages, new lengths."""
    rng = np.random.default_rng(seed)
    c = inp.case
    out = []
    for _ in range(count):
        M = inp.block_tables.shape[1]
        sl = rng.integers(c.q_len_per_req, (M - 1) * c.page_size + 1, size=c.batch).astype(np.int32)
        bt = rng.integers(0, inp.num_pages, size=inp.block_tables.shape).astype(np.int32)
        out.append((bt, sl))
    return out


# ----------------------------------------------------------------------------- jit


def test_jit_does_not_retrace_for_new_metadata_or_scales():
    case = cases.AttnCase(batch=3, kv_dtype="fp8", q_dtype="bf16", q_len_per_req=2, seed=60)
    inp = cases.make_inputs(case)
    traces = []

    @jax.jit
    def step(q, kp, vp, bt, sl, ks, vs):
        traces.append(1)
        return jpa.paged_decode(q, kp, vp, bt, sl, k_scale=ks, v_scale=vs, q_len_per_req=2,
                                return_lse=True)

    q, kp, vp = (put(a) for a in inp.args[:3])
    variants = [(inp.block_tables, inp.seq_lens)] + _metadata_variants(inp, 3, seed=61)
    for i, (bt, sl) in enumerate(variants):
        ks, vs = np.float32(0.3 + 0.2 * i), np.float32(1.5 - 0.1 * i)
        out, lse = step(q, kp, vp, put(bt), put(sl), ks, vs)
        want = jpa.paged_decode(q, kp, vp, put(bt), put(sl), k_scale=float(ks), v_scale=float(vs),
                                q_len_per_req=2, return_lse=True)
        assert_bitwise(np.asarray(out), np.asarray(want[0]))
        assert_bitwise(np.asarray(lse), np.asarray(want[1]), "lse")
    assert len(traces) == 1
    if hasattr(step, "_cache_size"):
        assert step._cache_size() == 1


def test_jit_prefill_does_not_retrace_for_new_cu_seqlens():
    case = cases.AttnCase(kind="prefill", batch=3, max_q_len=4, pad_back=3, seed=62)
    inp = cases.make_inputs(case)
    traces = []
    T = inp.num_tokens

    @jax.jit
    def step(*args):
        traces.append(1)
        return jpa.paged_prefill(*args, max_q_len=T, return_lse=True)

    rng = np.random.default_rng(63)
    for i in range(4):
        if i == 0:
            cu, sl = inp.cu_seqlens_q, inp.seq_lens
        else:
            cu = np.sort(rng.integers(0, T + 1, case.batch + 1)).astype(np.int32)
            sl = (np.diff(cu) + rng.integers(0, 3, case.batch)).astype(np.int32)
        bt = inp.block_tables if i == 0 else _metadata_variants(inp, 1, seed=64 + i)[0][0]
        args = inp.with_args(cu_seqlens_q=cu, seq_lens=sl, block_tables=bt).args
        out, lse = step(*(put(a) for a in args))
        r_out, r_lse = cases.run_reference(ref.paged_prefill, inp.with_args(
            cu_seqlens_q=cu, seq_lens=sl, block_tables=bt), max_q_len=T)
        assert_close(np.asarray(out), r_out, nan_ok=True)
        assert_close(np.asarray(lse), r_lse, cases.LSE_TOLERANCE, nan_ok=True, what="lse")
    assert len(traces) == 1


# ----------------------------------------------------------------------------- vmap


def _vmap_inputs(n_outer, case, seed):
    """n_outer query batches + metadata over one shared cache."""
    base = cases.make_inputs(case)
    rng = np.random.default_rng(seed)
    qs, bts, sls = [], [], []
    for i, (bt, sl) in enumerate([(base.block_tables, base.seq_lens)]
                                 + _metadata_variants(base, n_outer - 1, seed)):
        q = rng.standard_normal(base.q.shape, dtype=np.float32).astype(base.q.dtype)
        qs.append(q), bts.append(bt), sls.append(sl)
    return base, np.stack(qs), np.stack(bts), np.stack(sls)


@pytest.mark.parametrize("opts", [
    dict(), dict(q_len_per_req=2, return_lse=True), dict(sinks=True, window_left=3, return_lse=True),
    dict(kv_layout="HND", combined=True, kv_dtype="bf16", q_dtype="bf16")], ids=str)
def test_vmap_decode_shared_cache_equals_loop(opts):
    copts = {k: v for k, v in opts.items() if k != "return_lse"}
    case = dataclasses.replace(cases.AttnCase(seed=65), **copts)
    base, qs, bts, sls = _vmap_inputs(4, case, seed=66)
    kw = dict(base.kwargs, return_lse=True)
    kp, vp = put(base.args[1]), put(base.args[2])

    def one(q, bt, sl):
        return jpa.paged_decode(q, kp, vp, bt, sl, **kw)

    f = jax.vmap(one)
    jaxpr = str(jax.make_jaxpr(f)(qs, bts, sls))
    assert jaxpr.count("jpa_paged_decode") == 1 and "while" not in jaxpr and "scan" not in jaxpr
    out, lse = f(put(qs), put(bts), put(sls))
    for i in range(len(qs)):
        o, l_ = one(put(qs[i]), put(bts[i]), put(sls[i]))
        assert_close(np.asarray(out[i]), np.asarray(o), 1e-6)
        assert_close(np.asarray(lse[i]), np.asarray(l_), 1e-6, what="lse")
        r_out, r_lse = cases.run_reference(ref.paged_decode, base.with_args(
            q=qs[i], block_tables=bts[i], seq_lens=sls[i]))
        assert_close(np.asarray(out[i]), r_out)


def test_vmap_decode_query_only_and_split_qkv():
    """vmap over packed projections only (metadata shared), q a split_qkv view."""
    case = cases.AttnCase(batch=3, q_dtype="bf16", kv_dtype="bf16", seed=67)
    base = cases.make_inputs(case)
    Hq, Hkv, D = case.num_q_heads, case.num_kv_heads, case.head_dim
    rng = np.random.default_rng(68)
    qkv = rng.standard_normal((3, case.batch, (Hq + 2 * Hkv) * D), dtype=np.float32).astype(base.q.dtype)
    rest = [put(a) for a in base.args[1:]]

    def one(x):
        q, _, _ = jpa.split_qkv(x, Hq, Hkv)
        return jpa.paged_decode(q, *rest)

    out = jax.vmap(one)(put(qkv))
    for i in range(3):
        assert_close(np.asarray(out[i]), np.asarray(one(put(qkv[i]))), 1e-6)


def test_vmap_prefill_equals_loop():
    case = cases.AttnCase(kind="prefill", batch=2, max_q_len=3, seed=69)
    base = cases.make_inputs(case)
    rng = np.random.default_rng(70)
    qs = np.stack([rng.standard_normal(base.q.shape, dtype=np.float32) for _ in range(3)])
    rest = [put(a) for a in base.args[1:]]
    kw = dict(base.kwargs, return_lse=True)

    def one(q):
        return jpa.paged_prefill(q, *rest, **kw)

    out, lse = jax.vmap(one)(put(qs))
    for i in range(3):
        o, l_ = one(put(qs[i]))
        assert_close(np.asarray(out[i]), np.asarray(o), 1e-6)
        assert_close(np.asarray(lse[i]), np.asarray(l_), 1e-6, what="lse")


def test_vmap_append_over_caches_equals_loop():
    ac = cases.AppendCase(kv_dtype="bf16", new_dtype="f32", skip_fraction=0.2)
    ins = [cases.make_append_inputs(dataclasses.replace(ac, seed=s))[0] for s in range(3)]
    stacked = [np.stack([x[j] for x in ins]) for j in range(5)]
    gk, gv = jax.vmap(jpa.append_kv)(*(put(a) for a in stacked))
    for i, x in enumerate(ins):
        wk, wv = jpa.append_kv(*(put(a) for a in x))
        assert_bitwise(np.asarray(gk[i]), np.asarray(wk))
        assert_bitwise(np.asarray(gv[i]), np.asarray(wv))


# ----------------------------------------------------------------------------- export


def _export_round_trip(fn, args, targets, serialized, platforms=None):
    """Export ``jax.jit(fn)``; with ``serialized`` go through bytes and back."""
    checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in targets]
    kw = {"platforms": platforms or ("cpu",)}
    exp = jax.export.export(jax.jit(fn), disabled_checks=checks, **kw)(*args)
    if not serialized:
        return exp, exp
    # jax needs the optional `flatbuffers` package to serialize an Exported
    pytest.importorskip("flatbuffers", reason="jax.export serialization needs flatbuffers")
    blob = exp.serialize()
    assert isinstance(blob, (bytes, bytearray)) and len(blob) > 0
    back = jax.export.deserialize(blob)
    return exp, back


SERIALIZED = pytest.mark.parametrize("serialized", [False, True], ids=["in_memory", "serialized"])


@SERIALIZED
@pytest.mark.parametrize("op", ["decode", "prefill"])
def test_export_round_trip_attention(op, serialized):
    case = cases.AttnCase(kind=op, q_dtype="bf16", kv_dtype="bf16", sinks=True, window_left=5,
                          seed=71)
    inp = cases.make_inputs(case)
    fn = jpa.paged_decode if op == "decode" else jpa.paged_prefill
    kw = dict(inp.kwargs, return_lse=True)
    sinks = put(kw.pop("sinks"))
    args = [put(a) for a in inp.args]
    f = lambda *a: fn(*a, sinks=sinks, **kw)  # noqa: E731
    exp, back = _export_round_trip(f, args, [f"jpa_paged_{op}"], serialized)
    assert back.in_avals == exp.in_avals and back.out_avals == exp.out_avals
    assert f"jpa_paged_{op}" in back.mlir_module()
    got = back.call(*args)
    want = f(*args)
    assert_bitwise(np.asarray(got[0]), np.asarray(want[0]))
    assert_bitwise(np.asarray(got[1]), np.asarray(want[1]), "lse")


def test_export_without_disabling_the_check_refuses():
    """The custom call is not on JAX's stable list, so export needs the explicit opt-in."""
    inp = cases.make_inputs(cases.AttnCase(seed=72))
    args = [put(a) for a in inp.args]
    with pytest.raises(ValueError, match="jpa_paged_decode"):
        jax.export.export(jax.jit(jpa.paged_decode))(*args)


@SERIALIZED
def test_export_round_trip_append(serialized):
    ac = cases.AppendCase(kv_dtype="fp8", new_dtype="bf16", k_scale=0.5, seed=73)
    (kp, vp, k, v, slots), kw = cases.make_append_inputs(ac)
    args = [put(a) for a in (kp, vp, k, v, slots)]
    f = lambda *a: jpa.append_kv(*a, **kw)  # noqa: E731
    _, back = _export_round_trip(f, args, ["jpa_append_kv"], serialized)
    got, want = back.call(*args), f(*args)
    assert_bitwise(np.asarray(got[0]), np.asarray(want[0]))
    assert_bitwise(np.asarray(got[1]), np.asarray(want[1]))


@SERIALIZED
def test_export_for_cpu_and_cuda_runs_on_cpu(serialized):
    """One artifact lowered for both platforms (CUDA-supported head_dim), called on the CPU."""
    case = cases.AttnCase(head_dim=64, q_dtype="bf16", kv_dtype="bf16", seed=74)
    inp = cases.make_inputs(case)
    args = [put(a) for a in inp.args]
    exp, back = _export_round_trip(jpa.paged_decode, args, ["jpa_paged_decode"], serialized,
                                   platforms=("cpu", "cuda"))
    assert tuple(back.platforms) == ("cpu", "cuda")
    assert_bitwise(np.asarray(back.call(*args)), np.asarray(jpa.paged_decode(*args)))


# ----------------------------------------------------------------------------- scan


def test_scan_over_layers_with_traced_scales():
    """A layer loop: stacked fp8 caches and per-layer scales as scan inputs."""
    n_layers = 3
    case = cases.AttnCase(kv_dtype="fp8", q_dtype="bf16", seed=76)
    inp = cases.make_inputs(case)
    rng = np.random.default_rng(77)
    kps = np.stack([inp.args[1]] + [rng.permutation(inp.args[1]) for _ in range(n_layers - 1)])
    vps = np.stack([inp.args[2]] + [rng.permutation(inp.args[2]) for _ in range(n_layers - 1)])
    ks = np.array([0.3, 0.7, 1.1], np.float32)
    vs = np.array([1.2, 0.4, 0.9], np.float32)
    q, bt, sl = put(inp.q), put(inp.block_tables), put(inp.seq_lens)

    def layers(q, kps, vps, ks, vs):
        def body(x, layer):
            kp, vp, k_s, v_s = layer
            o = jpa.paged_decode(x, kp, vp, bt, sl, k_scale=k_s, v_scale=v_s)
            return o.astype(x.dtype), o
        return jax.lax.scan(body, q, (kps, vps, ks, vs))[1]

    got = np.asarray(jax.jit(layers)(q, put(kps), put(vps), put(ks), put(vs)))
    x = q
    for i in range(n_layers):
        o = jpa.paged_decode(x, put(kps[i]), put(vps[i]), bt, sl, k_scale=float(ks[i]),
                             v_scale=float(vs[i]))
        assert_bitwise(got[i], np.asarray(o))
        x = o


# ----------------------------------------------------------------------------- checkify


def test_checkify_decode_step_raises_for_bad_metadata_only():
    case = cases.AttnCase(batch=3, garbage_tables=False, seed=78)
    inp = cases.make_inputs(case)
    meta = dict(num_pages=inp.num_pages, page_size=case.page_size)

    @jax.jit
    def step(q, kp, vp, bt, sl):
        jpa.check_metadata(bt, sl, **meta)
        return jpa.paged_decode(q, kp, vp, bt, sl)

    checked = checkify.checkify(step)
    err, out = checked(*(put(a) for a in inp.args))
    err.throw()  # valid: nothing raised
    assert_bitwise(np.asarray(out), np.asarray(jpa.paged_decode(*(put(a) for a in inp.args))))
    bad = inp.with_args(block_tables=np.where(np.arange(inp.block_tables.shape[0])[:, None] == 1,
                                              np.int32(-1), inp.block_tables))
    err, out = checked(*(put(a) for a in bad.args))
    with pytest.raises(checkify.JaxRuntimeError, match=r"request 1\b"):
        err.throw()
    assert np.isnan(np.asarray(out)[1]).all()


# ----------------------------------------------------------------------------- autodiff


@pytest.mark.parametrize("op", ["decode", "prefill"])
@pytest.mark.parametrize("wrt", [0, 1])
def test_grad_raises_a_clear_error(op, wrt):
    case = cases.AttnCase(kind=op, seed=79)
    inp = cases.make_inputs(case)
    fn = jpa.paged_decode if op == "decode" else jpa.paged_prefill
    args = [put(a) for a in inp.args]
    kw = inp.kwargs

    def loss(*a):
        out = fn(*a, **kw)
        out = out[0] if isinstance(out, tuple) else out
        return jnp.sum(out.astype(jnp.float32))

    with pytest.raises(NotImplementedError, match=r"not differentiable"):
        jax.grad(loss, argnums=wrt)(*args)


def test_jvp_of_append_raises_a_clear_error():
    (kp, vp, k, v, slots), _ = cases.make_append_inputs(cases.AppendCase(seed=80))
    f = lambda k: jpa.append_kv(put(kp), put(vp), k, put(v), put(slots))[0]  # noqa: E731
    with pytest.raises(NotImplementedError, match=r"append_kv.*not differentiable"):
        jax.jvp(f, (put(k),), (put(np.ones_like(k)),))


def test_attention_results_sit_behind_an_optimization_barrier():
    """XLA's GPU dynamic-slice fusion clones a custom call whose result is written into a
    slice (a scan's stacked outputs) and runs it twice (measured: 2 kernels per layer); the
    entry points put their results behind an optimization barrier so that cannot happen."""
    case = cases.AttnCase(batch=2, seed=62)
    inp = cases.make_inputs(case)
    q, kp, vp = (put(a) for a in inp.args[:3])
    bt, sl = put(inp.block_tables), put(inp.seq_lens)

    def step(q_stack):
        def layer(carry, q):
            out = jpa.paged_decode(q + carry, kp, vp, bt, sl)
            return out * 0.5, out  # the result feeds the carry and the stacked ys
        return jax.lax.scan(layer, jnp.zeros_like(q_stack[0]), q_stack)[1]

    q_stack = jnp.stack([q, q * 0.5])
    text = jax.jit(step).lower(q_stack).as_text()
    assert text.count("jpa_paged_decode") >= 1
    assert "optimization_barrier" in text
    outs = np.asarray(jax.jit(step)(q_stack), np.float32)
    first = np.asarray(jpa.paged_decode(q, kp, vp, bt, sl), np.float32)
    assert_bitwise(outs[0], first)


_FRESH_PROCESS_CALL = """
import sys, numpy as np, jax
import jax_paged_attn  # registers the FFI handlers; no op is traced in this process
blob = open(sys.argv[1], "rb").read()
args = np.load(sys.argv[2])
exp = jax.export.deserialize(blob)
out = exp.call(*[args[f"a{i}"] for i in range(len(args.files) - 1)])
assert np.array_equal(np.asarray(out).view(np.uint8), args["want"].view(np.uint8))
print("OK")
"""


def test_export_with_the_package_constant_runs_in_a_fresh_process(tmp_path):
    """`EXPORT_DISABLED_CHECKS` is all an export needs, and a deserialized export finds our
    handlers in a process that only imported the package."""
    pytest.importorskip("flatbuffers", reason="jax.export serialization needs flatbuffers")
    inp = cases.make_inputs(cases.AttnCase(seed=73))
    args = [put(a) for a in inp.args]
    exp = jax.export.export(jax.jit(jpa.paged_decode),
                            disabled_checks=jpa.EXPORT_DISABLED_CHECKS)(*args)
    want = np.asarray(jpa.paged_decode(*args))
    (tmp_path / "f.bin").write_bytes(exp.serialize())
    np.savez(tmp_path / "args.npz", want=want, **{f"a{i}": np.asarray(a) for i, a in
                                                  enumerate(args)})
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", _FRESH_PROCESS_CALL, str(tmp_path / "f.bin"),
                          str(tmp_path / "args.npz")], capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr


def test_export_constant_covers_every_custom_call_of_a_stacked_append():
    k = jnp.zeros((2, 3, 4, 1, 8), jnp.float32) + 1.5
    new = jnp.full((2, 1, 8), 0.25, jnp.float32)
    f = lambda k, v, n, s: jpa.append_kv(k, v, n, n, s, layer=1)  # noqa: E731
    exp = jax.export.export(jax.jit(f), disabled_checks=jpa.EXPORT_DISABLED_CHECKS)(
        k, k, new, jnp.asarray([0, 5], jnp.int32))
    assert "jpa_append_kv" in exp.mlir_module()


def test_missing_extension_message_names_a_shadowing_source_tree(monkeypatch):
    from jax_paged_attn import _registry

    monkeypatch.setattr(_registry.importlib.metadata, "distribution", lambda name: object())
    msg = _registry._missing_extension_message()
    assert "shadowing" in msg and "source tree" in msg

    def missing(name):
        raise _registry.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(_registry.importlib.metadata, "distribution", missing)
    assert "is missing" in _registry._missing_extension_message()
