"""A StridedView is a pytree (its base is the one leaf; shape, strides and offset are static),
so views made outside a transformation cross jit, vmap, scan and shard_map boundaries and
give the same results as the dense operands they describe."""

from __future__ import annotations

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_paged_attn as jpa
from conftest import assert_bitwise, assert_close, run_on_fake_cpu_devices
from jax_paged_attn.views import materialize

pytestmark = pytest.mark.usefixtures("on_cpu")

HQ, HKV, D, PAGE, NPAGES, B = 4, 2, 8, 4, 10, 3


def _rand(rng, shape):
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32))


def _cache(rng):
    k, v = _rand(rng, (NPAGES, PAGE, HKV, D)), _rand(rng, (NPAGES, PAGE, HKV, D))
    bt = jnp.asarray(rng.permutation(NPAGES)[:B * 3].reshape(B, 3), jnp.int32)
    sl = jnp.asarray(rng.integers(1, 3 * PAGE + 1, B), jnp.int32)
    return k, v, bt, sl


def test_flatten_has_the_base_as_its_only_leaf():
    qkv = _rand(np.random.default_rng(0), (B, (HQ + 2 * HKV) * D))
    q, k, v = jpa.split_qkv(qkv, HQ, HKV)
    leaves, treedef = jax.tree.flatten(k)
    assert len(leaves) == 1 and leaves[0] is qkv
    rebuilt = jax.tree.unflatten(treedef, [qkv * 2])
    assert isinstance(rebuilt, jpa.StridedView)
    assert (rebuilt.shape, rebuilt.strides, rebuilt.offset) == (k.shape, k.strides, k.offset)
    assert_bitwise(np.asarray(materialize(rebuilt)), np.asarray(materialize(k)) * 2)
    # Geometry is static: views of the same geometry share a treedef, others do not.
    assert jax.tree.structure(k) == jax.tree.structure(jpa.split_qkv(qkv + 1, HQ, HKV)[1])
    assert jax.tree.structure(k) != jax.tree.structure(v)
    mapped = jax.tree.map(lambda x: x.astype(jnp.bfloat16), (q, k, v))
    assert all(m.dtype == jnp.bfloat16 and m.shape == o.shape for m, o in zip(mapped, (q, k, v)))


def test_views_cross_jit_without_retrace():
    rng = np.random.default_rng(1)
    kp, vp, bt, sl = _cache(rng)
    slots = jnp.asarray(rng.permutation(NPAGES * PAGE)[:B], jnp.int32)
    traces = []

    @jax.jit
    def step(kp, vp, q, k, v, slots):
        traces.append(1)
        kp, vp = jpa.append_kv(kp, vp, k, v, slots)
        return jpa.paged_decode(q, kp, vp, bt, sl), kp, vp

    for i in range(2):
        qkv = _rand(rng, (B, (HQ + 2 * HKV) * D))
        q, k, v = jpa.split_qkv(qkv, HQ, HKV)      # views made outside the jitted function
        out, kp2, vp2 = step(kp, vp, q, k, v, slots)
        dense = [materialize(x) for x in (q, k, v)]
        want_k, want_v = jpa.append_kv(kp, vp, dense[1], dense[2], slots)
        want = jpa.paged_decode(dense[0], want_k, want_v, bt, sl)
        assert_bitwise(np.asarray(kp2), np.asarray(want_k))
        assert_bitwise(np.asarray(out), np.asarray(want))
    assert len(traces) == 1


def test_views_cross_vmap_in_and_out():
    rng = np.random.default_rng(2)
    kp, vp, bt, sl = _cache(rng)
    qkv = _rand(rng, (5, B, (HQ + 2 * HKV) * D))            # 5 examples
    # Views returned by vmap: their base carries the mapped axis.
    views = jax.vmap(lambda x: jpa.split_qkv(x, HQ, HKV))(qkv)
    assert views[0].base.shape == qkv.shape and views[0].shape == (B, HQ, D)
    out = jax.vmap(lambda q: jpa.paged_decode(q, kp, vp, bt, sl))(views[0])
    for i in range(qkv.shape[0]):
        q_i = jpa.split_qkv(qkv[i], HQ, HKV)[0]
        assert_close(np.asarray(out[i]), np.asarray(jpa.paged_decode(q_i, kp, vp, bt, sl)),
                     1e-6)


def test_views_cross_scan():
    rng = np.random.default_rng(3)
    kp, vp, bt, sl = _cache(rng)
    qkv = _rand(rng, (4, B, (HQ + 2 * HKV) * D))
    views = jax.vmap(lambda x: jpa.split_qkv(x, HQ, HKV))(qkv)

    def body(acc, q):
        out = jpa.paged_decode(q, kp, vp, bt, sl)
        return acc + out, out

    total, outs = jax.lax.scan(body, jnp.zeros((B, HQ, D)), views[0])
    for i in range(qkv.shape[0]):
        want = jpa.paged_decode(jpa.split_qkv(qkv[i], HQ, HKV)[0], kp, vp, bt, sl)
        assert_bitwise(np.asarray(outs[i]), np.asarray(want))
    assert_close(np.asarray(total), np.asarray(outs.sum(0)), 1e-6)


_SHARD_MAP = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    import jax_paged_attn as jpa
    from jax_paged_attn.views import materialize
    rng = np.random.default_rng(4)
    hq, hkv, d, page, npages, b = 4, 2, 8, 4, 12, 4
    k = jnp.asarray(rng.standard_normal((npages, page, hkv, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((npages, page, hkv, d)), jnp.float32)
    bt = jnp.asarray(rng.permutation(npages).reshape(b, 3), jnp.int32)
    sl = jnp.asarray([5, 12, 1, 7], jnp.int32)
    qkv = jnp.asarray(rng.standard_normal((b, (hq + 2 * hkv) * d)), jnp.float32)
    q = jpa.split_qkv(qkv, hq, hkv)[0]          # a view made outside shard_map
    mesh = Mesh(np.array(jax.devices()), ("x",))
    # The view travels replicated (its geometry describes the whole base); the batch of
    # metadata is split over the devices and each device attends for its own requests.
    def local(q, bt, sl):
        idx = jax.lax.axis_index("x")
        rows = jax.lax.dynamic_slice_in_dim(materialize(q), idx * (b // 2), b // 2)
        return jpa.paged_decode(rows, k, v, bt, sl)
    f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P("x"), P("x")),
                                 out_specs=P("x")))
    out = f(q, bt, sl)
    ref = jpa.paged_decode(materialize(q), k, v, bt, sl)
    err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert err <= 1e-6, err
    assert len(out.sharding.device_set) == 2
    print("OK", err)
""")


def test_views_cross_shard_map():
    run_on_fake_cpu_devices(_SHARD_MAP)
