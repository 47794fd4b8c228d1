"""Sharding over heads with shard_map: each device runs the kernel on its slice of query and
KV heads, and the result equals the unsharded call. Runs in a subprocess so the forced
2-device CPU platform does not leak into other tests."""

import textwrap

from conftest import run_on_fake_cpu_devices

_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    import jax_paged_attn as jpa
    assert len(jax.devices()) == 2, jax.devices()
    rng = np.random.default_rng(3)
    hq, hkv, d, page, npages, b = 8, 4, 32, 4, 12, 3
    k = jnp.asarray(rng.standard_normal((npages, page, hkv, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((npages, page, hkv, d)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((b, hq, d)), jnp.float32)
    sinks = jnp.asarray(rng.standard_normal(hq), jnp.float32)
    bt = jnp.asarray(rng.permutation(npages).reshape(b, 4), jnp.int32)
    sl = jnp.asarray([5, 16, 1], jnp.int32)
    mesh = Mesh(np.array(jax.devices()), ("heads",))
    def local(q, k, v, bt, sl, sinks):
        return jpa.paged_decode(q, k, v, bt, sl, sinks=sinks)
    sharded = jax.jit(jax.shard_map(
        local, mesh=mesh,
        in_specs=(P(None, "heads"), P(None, None, "heads"), P(None, None, "heads"), P(), P(),
                  P("heads")),
        out_specs=P(None, "heads")))
    out = sharded(q, k, v, bt, sl, sinks)
    ref = jpa.paged_decode(q, k, v, bt, sl, sinks=sinks)
    err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert err <= 1e-6, err
    assert len(out.sharding.device_set) == 2
    print("OK", err)
""")


def test_shard_map_over_heads_matches_unsharded():
    run_on_fake_cpu_devices(_SCRIPT)
