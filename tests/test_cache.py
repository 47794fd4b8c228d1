"""The page allocator (property tests over random request histories) and the step metadata
builder (against a plain-Python restatement, and through append_kv + paged_prefill)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_paged_attn as jpa
from conftest import assert_close
from jax_paged_attn.cache import PageAllocator, PoolExhausted, step_metadata

pytestmark = pytest.mark.usefixtures("on_cpu")


def _check_invariants(alloc, lengths):
    owned = [p for r in alloc.requests for p in alloc.pages(r)]
    assert len(owned) == len(set(owned)), "a page is owned twice"
    assert set(owned).isdisjoint(alloc._free), "an owned page is also free"
    assert sorted(owned + alloc._free) == list(range(alloc.num_pages)), "pages lost or made"
    for r, n in lengths.items():
        assert len(alloc.pages(r)) == alloc.pages_needed(n)


@pytest.mark.parametrize("seed", range(6))
def test_random_histories_keep_ownership_exclusive(seed):
    rng = np.random.default_rng(seed)
    alloc = PageAllocator(num_pages=int(rng.integers(1, 40)), page_size=int(rng.integers(1, 9)))
    lengths: dict[int, int] = {}
    exhausted = 0
    for _ in range(400):
        r = int(rng.integers(0, 12))
        if rng.random() < 0.25 and r in lengths:
            freed = alloc.free(r)
            assert freed == alloc.pages_needed(lengths.pop(r))
        else:
            n = lengths.get(r, 0) + int(rng.integers(0, 3 * alloc.page_size))
            before = (dict((q, alloc.pages(q)) for q in alloc.requests), list(alloc._free))
            ok = alloc.can_reserve(r, n)
            try:
                pages = alloc.reserve(r, n)
            except PoolExhausted as e:
                exhausted += 1
                assert not ok and f"request {r}" in str(e) and "free" in str(e)
                after = (dict((q, alloc.pages(q)) for q in alloc.requests), list(alloc._free))
                assert after == before, "a refused reserve changed the state"
            else:
                assert ok
                # Growing keeps the pages already held, in order (their keys stay put).
                assert pages[:len(before[0].get(r, []))] == before[0].get(r, [])
                lengths[r] = max(n, lengths.get(r, 0))
        _check_invariants(alloc, lengths)
    assert exhausted > 0 or alloc.num_pages > 30   # small pools must have pushed back


def test_block_tables_and_reuse():
    alloc = PageAllocator(num_pages=6, page_size=4)
    assert alloc.reserve("a", 9) == [0, 1, 2]
    assert alloc.reserve("b", 4) == [3]
    with pytest.raises(PoolExhausted, match="needs 3 more page"):
        alloc.reserve("c", 12)
    assert alloc.free("a") == 3
    assert alloc.reserve("c", 12) == [0, 1, 2]          # freed pages are reused
    table = alloc.block_tables(["c", None, "b"], max_pages=4)
    np.testing.assert_array_equal(table, [[0, 1, 2, -1], [-1] * 4, [3, -1, -1, -1]])
    assert table.dtype == np.int32
    with pytest.raises(ValueError, match="max_pages"):
        alloc.block_tables(["c"], max_pages=2)
    with pytest.raises(ValueError):
        alloc.reserve("d", -1)


def _slots_by_hand(table, start, num_new, num_tokens, page_size):
    slots, pos = [], []
    for b, (s, n) in enumerate(zip(start, num_new)):
        for i in range(n):
            p = s + i
            slots.append(table[b, p // page_size] * page_size + p % page_size)
            pos.append(p)
    pad = num_tokens - len(slots)
    return np.array(slots + [-1] * pad), np.array(pos + [0] * pad)


@pytest.mark.parametrize("seed", range(4))
def test_step_metadata_matches_a_plain_restatement(seed):
    rng = np.random.default_rng(seed)
    ps = int(rng.integers(1, 6))
    alloc = PageAllocator(num_pages=200, page_size=ps)
    B = int(rng.integers(1, 6))
    start = rng.integers(0, 20, B)
    num_new = np.where(rng.random(B) < 0.4, 1, rng.integers(0, 9, B))
    for b in range(B):
        alloc.reserve(b, int(start[b] + num_new[b]))
    table = alloc.block_tables(range(B), max_pages=64)
    T = int(num_new.sum()) + int(rng.integers(0, 4))
    meta = jax.jit(step_metadata, static_argnames=("num_tokens", "page_size"))(
        table, start, num_new, num_tokens=T, page_size=ps)
    slots, pos = _slots_by_hand(table, start, num_new, T, ps)
    np.testing.assert_array_equal(meta.slot_mapping, slots)
    np.testing.assert_array_equal(meta.positions, pos)
    np.testing.assert_array_equal(meta.seq_lens, start + num_new)
    np.testing.assert_array_equal(meta.cu_seqlens_q, np.concatenate([[0], np.cumsum(num_new)]))
    assert len(set(slots[slots >= 0].tolist())) == int(num_new.sum())


def test_metadata_drives_append_and_prefill():
    """Two chunks of a prompt written with the builder's slots, then attended: the same as
    dense causal attention over the whole prompt."""
    rng = np.random.default_rng(3)
    hkv, group, d, ps, L = 2, 2, 16, 3, 11
    alloc = PageAllocator(num_pages=12, page_size=ps)
    alloc.reserve("r", 4)                  # a page allocated early, so pages are not in order
    alloc.reserve("other", 5)
    alloc.reserve("r", L)
    kp = jnp.asarray(rng.standard_normal((12, ps, hkv, d)), jnp.float32)
    vp = jnp.asarray(rng.standard_normal((12, ps, hkv, d)), jnp.float32)
    k_all = rng.standard_normal((L, hkv, d)).astype(np.float32)
    v_all = rng.standard_normal((L, hkv, d)).astype(np.float32)
    q_all = rng.standard_normal((L, hkv * group, d)).astype(np.float32)
    table = alloc.block_tables(["r"], max_pages=6)
    outs = []
    for lo, hi in ((0, 7), (7, L)):
        meta = step_metadata(table, [lo], [hi - lo], num_tokens=8, page_size=ps)
        pad = 8 - (hi - lo)
        k = jnp.asarray(np.pad(k_all[lo:hi], ((0, pad), (0, 0), (0, 0))))
        v = jnp.asarray(np.pad(v_all[lo:hi], ((0, pad), (0, 0), (0, 0))))
        q = jnp.asarray(np.pad(q_all[lo:hi], ((0, pad), (0, 0), (0, 0))))
        kp, vp = jpa.append_kv(kp, vp, k, v, meta.slot_mapping)
        out = jpa.paged_prefill(q, kp, vp, jnp.asarray(table), meta.seq_lens,
                                meta.cu_seqlens_q, max_q_len=8)
        outs.append(np.asarray(out)[:hi - lo])
    got = np.concatenate(outs)
    # Dense causal attention over the whole prompt.
    kk = np.repeat(k_all, group, axis=1)
    vv = np.repeat(v_all, group, axis=1)
    s = np.einsum("qhd,khd->hqk", q_all, kk) / np.sqrt(d)
    s = np.where(np.tril(np.ones((L, L), bool))[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("hqk,khd->qhd", p, vv)
    assert_close(got, want, 1e-5)
