"""Head-parallel (tensor-parallel) ops on 4 fake CPU devices: each equals the unsharded call,
the compiled module holds no collective (nothing gathered, nothing exchanged), outputs stay
head-sharded, and misuse gets a clear error."""

from __future__ import annotations

import textwrap

import pytest

from conftest import run_on_fake_cpu_devices

_PRELUDE = textwrap.dedent("""
    import re
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    import jax_paged_attn as jpa
    from jax_paged_attn.sharding import HeadParallel
    mesh = Mesh(np.array(jax.devices()), ("tp",))
    tp = HeadParallel(mesh, "tp")
    rng = np.random.default_rng(11)
    def rand(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)
    COLLECTIVES = re.compile(r"all-gather|all-to-all|all-reduce|collective-permute|reduce-scatter")
    def no_collectives(f, *args):
        text = jax.jit(f).lower(*args).compile().as_text()
        found = COLLECTIVES.findall(text)
        assert not found, found
    def close(a, b, tol=1e-6):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
        assert err <= tol, err
    def head_sharded(x, axis):
        spec = x.sharding.spec
        assert len(x.sharding.device_set) == 4 and spec[axis] == "tp", x.sharding
    hq, hkv, d, page, npages, b = 8, 4, 16, 4, 24, 5
    bt = jnp.asarray(rng.permutation(npages)[:b * 4].reshape(b, 4), jnp.int32)
    sl = jnp.asarray([5, 16, 1, 9, 12], jnp.int32)
""")

_DECODE = _PRELUDE + textwrap.dedent("""
    q = rand(b, hq, d)
    k, v = rand(npages, page, hkv, d), rand(npages, page, hkv, d)
    sinks = rand(hq)
    want, want_lse = jpa.paged_decode(q, k, v, bt, sl, sinks=sinks, return_lse=True)
    qs, ks, vs = tp.place(q, tp.spec_q()), tp.place(k, tp.spec_pages(4)), tp.place(v, tp.spec_pages(4))
    f = lambda q, k, v, bt, sl, s: tp.paged_decode(q, k, v, bt, sl, sinks=s, return_lse=True)
    out, lse = jax.jit(f)(qs, ks, vs, bt, sl, sinks)
    close(out, want); close(lse, want_lse)
    head_sharded(out, 1); head_sharded(lse, 1)
    no_collectives(f, qs, ks, vs, bt, sl, sinks)
    # HND, combined pages
    kv = jnp.stack([jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)], axis=1)   # [P, 2, Hkv, page, D]
    want = jpa.paged_decode(q, kv, None, bt, sl, kv_layout="HND")
    kvs = tp.place(kv, tp.spec_pages(5, "HND", combined=True))
    g = lambda q, kv, bt, sl: tp.paged_decode(q, kv, None, bt, sl, kv_layout="HND")
    close(jax.jit(g)(qs, kvs, bt, sl), want)
    no_collectives(g, qs, kvs, bt, sl)
    print("OK")
""")

_PREFILL_STACK = _PRELUDE + textwrap.dedent("""
    q_lens = np.array([3, 7, 1, 4, 2]); kv_lens = np.array([5, 16, 1, 9, 12])
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    T = int(q_lens.sum()) + 2
    q = rand(T, hq, d)
    L = 3
    ks, vs = rand(L, npages, page, hkv, d), rand(L, npages, page, hkv, d)
    kw = dict(max_q_len=7, window_left=6, logits_soft_cap=4.0)
    spec = tp.spec_pages(5, stacked=True)
    kss, vss, qs = tp.place(ks, spec), tp.place(vs, spec), tp.place(q, tp.spec_q())
    def per_layer(q, ks, vs, bt, sl, cu):
        def body(acc, i):
            return acc + tp.paged_prefill(q, ks, vs, bt, sl, cu, layer=i, **kw), None
        return jax.lax.scan(body, jnp.zeros_like(q), jnp.arange(L, dtype=jnp.int32))[0]
    got = jax.jit(per_layer)(qs, kss, vss, bt, sl, cu)
    want = sum(jpa.paged_prefill(q, ks, vs, bt, sl, cu, layer=i, **kw) for i in range(L))
    close(got, want)
    head_sharded(got, 1)
    no_collectives(per_layer, qs, kss, vss, bt, sl, cu)
    print("OK")
""")

_APPEND_RAGGED = _PRELUDE + textwrap.dedent("""
    T = 9
    k_new, v_new = rand(T, hkv, d), rand(T, hkv, d)
    slots = jnp.asarray(rng.permutation(npages * page)[:T].astype(np.int32))
    k, v = rand(npages, page, hkv, d), rand(npages, page, hkv, d)
    wk, wv = jpa.append_kv(k, v, k_new, v_new, slots)
    spec = tp.spec_pages(4)
    f = lambda k, v, kn, vn, s: tp.append_kv(k, v, kn, vn, s)
    args = (tp.place(k, spec), tp.place(v, spec), tp.place(k_new, tp.spec_q()),
            tp.place(v_new, tp.spec_q()), slots)
    gk, gv = jax.jit(f, donate_argnums=(0, 1))(*args)
    np.testing.assert_array_equal(np.asarray(gk), np.asarray(wk))
    np.testing.assert_array_equal(np.asarray(gv), np.asarray(wv))
    head_sharded(gk, 2)
    # interleaved pages: append, then ragged attention
    kv = rand(npages, page, 2 * hkv, d)
    want_pages = jpa.ragged_append_kv(kv, k_new, v_new, slots)
    ispec = tp.spec_pages(4, "interleaved")
    got_pages = jax.jit(tp.ragged_append_kv)(tp.place(kv, ispec), tp.place(k_new, tp.spec_q()),
                                             tp.place(v_new, tp.spec_q()), slots)
    np.testing.assert_array_equal(np.asarray(got_pages), np.asarray(want_pages))
    q_lens = np.array([3, 1, 1, 4, 2])   # <= kv lens 5, 16, 1, 9, 12
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    q = rand(int(q_lens.sum()) + 1, hq, d)
    ns = jnp.asarray([4], jnp.int32)
    want = jpa.ragged_paged_attention(q, want_pages, sl, bt, cu, ns, sm_scale=0.3)
    h = lambda q, kv, sl, bt, cu, ns: tp.ragged_paged_attention(q, kv, sl, bt, cu, ns, sm_scale=0.3)
    args = (tp.place(q, tp.spec_q()), got_pages, sl, bt, cu, ns)
    close(jax.jit(h)(*args), want)
    no_collectives(h, *args)
    print("OK")
""")

_MISUSE = _PRELUDE + textwrap.dedent("""
    def raises(exc, words, fn):
        try:
            fn()
        except exc as e:
            assert all(w in str(e) for w in words), str(e)
        else:
            raise AssertionError("no error")
    k, v = rand(npages, page, hkv, d), rand(npages, page, hkv, d)
    raises(ValueError, ["q", "6 heads", "size 4"],
           lambda: tp.paged_decode(rand(b, 6, d), k, v, bt, sl))
    raises(ValueError, ["k_pages", "2 heads"],
           lambda: tp.paged_decode(rand(b, 8, d), rand(npages, page, 2, d),
                                   rand(npages, page, 2, d), bt, sl))
    qkv = rand(b, (hq + 2 * hkv) * d)
    raises(TypeError, ["q", "StridedView", "split_qkv"],
           lambda: tp.paged_decode(jpa.split_qkv(qkv, hq, hkv)[0], k, v, bt, sl))
    raises(ValueError, ["no axis", "'model'"], lambda: HeadParallel(mesh, "model"))
    print("OK")
""")


@pytest.mark.parametrize("script", [_DECODE, _PREFILL_STACK, _APPEND_RAGGED, _MISUSE],
                         ids=["decode", "prefill-stacked", "append-ragged", "misuse"])
def test_head_parallel(script):
    run_on_fake_cpu_devices(script, count=4)


# The ops inside a user's own shard_map over heads (what HeadParallel wraps).
_USER_SHARD_MAP = textwrap.dedent("""
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



def test_user_shard_map_over_heads_matches_unsharded():
    run_on_fake_cpu_devices(_USER_SHARD_MAP)
