"""CUDA kernels at sizes where 32-bit offsets would overflow (skipped without a CUDA device).

Each test builds an operand whose byte span (and, where the name says so, element count)
passes 2^31 and checks that the kernels address its far end correctly:

* a strided q sliced by ``split_qkv`` out of a packed QKV of more than 2^31 bytes (decode,
  with a float32 output of more than 2^31 bytes, and prefill);
* KV page pools of more than 2^31 bytes and of more than 2^31 elements (bf16 and fp8,
  separate and combined, NHD and HND), read by decode (with KV splits) and prefill through
  requests whose pages sit at the pool's far end;
* a prefill output of more than 2^31 elements;
* ``append_kv`` into slots at the far end of a pool of more than 2^31 elements.

The float32 reference runs only on a sample: the requests whose rows or pages sit at the far
end plus a few at the start, with q rows and pages taken by static slices (so the oracle's
inputs do not depend on the kernels' address arithmetic). Outputs start NaN-poisoned (donated
buffers) and the whole output is checked for NaN on the device, so a row left unwritten fails
too. Sizes keep each test below ~20 GB of GPU memory and a few seconds of kernel time.

JPA_TEST_GPU_SUITE_ON_CPU=1 (as for test_gpu.py) runs the same tests on the CPU at small sizes:
no offset passes 2^31 then, it only checks the tests' own logic.
"""

from __future__ import annotations

import functools
import gc
import math
import zlib

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import cases  # noqa: E402
from conftest import assert_bitwise, assert_close, gpu_device  # noqa: E402


GPU = gpu_device()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPU is None, reason="no CUDA device")]
SMALL = GPU is not None and GPU.platform == "cpu"  # self-check sizes

if GPU is not None:
    import jax_paged_attn as jpa
    from jax_paged_attn import reference as ref

TWO31 = 2**31
HQ, HKV = 32, 8
LSE_TOL = cases.GPU_LSE_TOLERANCE
OUT_TOL = 1e-2  # bf16 somewhere in every chain below
_DT = cases.DTYPES
_CHUNK_ELEMS = 1 << 27  # float32 elements per slab of the random fill (512 MB)


def _size(big, small):
    return small if SMALL else big


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    gc.collect()  # multi-GB arrays of a failed test must not stay alive for the next one


# ----------------------------------------------------------------------------- operands


@functools.lru_cache(maxsize=None)
def _fill_fn(shape, dtype, rows, std):
    def fill(buf, key, start):
        x = jax.random.normal(key, (rows,) + shape[1:], jnp.float32) * std
        x = jnp.where(x == 0, jnp.float32(0.125), x).astype(dtype)
        return jax.lax.dynamic_update_slice_in_dim(buf, x, start, axis=0)

    return jax.jit(fill, donate_argnums=0)


def random_array(seed, shape, dtype, std=1.0):
    """Normal(0, std) values (never 0) of `dtype` on the device, drawn slab by slab along the
    leading axis, so no float32 copy of a multi-GB array is ever built."""
    shape = tuple(int(s) for s in shape)
    dtype = jnp.dtype(dtype)
    rows = max(1, min(shape[0], _CHUNK_ELEMS // max(math.prod(shape[1:]), 1)))
    fill = _fill_fn(shape, dtype, rows, float(std))
    with jax.default_device(GPU):
        buf = jnp.zeros(shape, dtype)
    key = jax.random.PRNGKey(seed)
    for i, start in enumerate(range(0, shape[0], rows)):
        buf = fill(buf, jax.random.fold_in(key, i), min(start, shape[0] - rows))
    return buf


def page_shape(num_pages, page_size, head_dim, layout, combined):
    geom = (page_size, HKV, head_dim) if layout == "NHD" else (HKV, page_size, head_dim)
    return (num_pages,) + ((2,) if combined else ()) + geom


def big_pool(seed, num_pages, page_size, head_dim, kv, layout, combined, fp8_scales):
    """(k_pages, v_pages, op kwargs) of a random pool (seeds `seed`, `seed + 1`); fp8 pages
    get the given (k_scale, v_scale)."""
    std = 1.5 if kv == "fp8" else 1.0
    shape = page_shape(num_pages, page_size, head_dim, layout, combined)
    kp = random_array(seed, shape, _DT[kv], std)
    vp = None if combined else random_array(seed + 1, shape, _DT[kv], std)
    opts = dict(kv_layout=layout)
    if kv == "fp8":
        opts.update(k_scale=fp8_scales[0], v_scale=fp8_scales[1])
    return kp, vp, opts


def garbage(num_pages):
    """Page indices out of range of the pool (and of every small pool sliced from it)."""
    return np.array(cases.GARBAGE_PAGES + (num_pages, num_pages + 3), np.int64)


def tables(rng, kv_lens, page_size, pages, num_pages, distinct=True, extra_cols=1):
    """Block tables whose needed entries are drawn from `pages` (distinct, or with repetition,
    which is legal: pages are only read) and whose other entries hold garbage."""
    npg = [-(-int(n) // page_size) for n in kv_lens]
    cols = max(npg) + extra_cols
    bt = rng.choice(garbage(num_pages), size=(len(npg), cols))
    if distinct:
        order = rng.permutation(np.asarray(pages))
        assert sum(npg) <= len(order), "test setup: not enough pages"
    nxt = 0
    for b, n in enumerate(npg):
        if distinct:
            bt[b, :n] = order[nxt:nxt + n]
            nxt += n
        else:
            bt[b, :n] = rng.choice(np.asarray(pages), size=n)
    return bt.astype(np.int32)


class FarSample:
    """Pages [0, head) and [P - tail, P) of a pool of P pages as a small pool (static slices),
    with the maps of page indices and slots into it. Anything outside both ranges must be out
    of range (garbage), and stays out of range in the small pool."""

    def __init__(self, num_pages, head, tail):
        assert head + tail < num_pages
        self.P, self.head, self.tail = num_pages, head, tail
        self.lo = num_pages - tail  # first page of the far range

    def pages(self, pool):
        if pool is None:
            return None
        return jnp.concatenate([pool[:self.head], pool[self.lo:]], axis=0)

    def _map(self, x, unit):
        x = np.asarray(x, np.int64)
        near = (x >= 0) & (x < self.head * unit)
        far = (x >= self.lo * unit) & (x < self.P * unit)
        rest = ~(near | far)
        assert np.all((x[rest] < 0) | (x[rest] >= self.P * unit)), "test setup: middle index"
        out = x.copy()
        out[far] = x[far] - (self.lo - self.head) * unit
        return out.astype(np.int32)

    def table(self, bt):
        return self._map(bt, 1)

    def slots(self, slots, page_size):
        return self._map(slots, page_size)


# ----------------------------------------------------------------------------- running


@functools.lru_cache(maxsize=None)
def _poisoned_fn(api_fn, static_items, q_view):
    """jit(f(out_poison, lse_poison, q, *args)) with the poison buffers donated, so XLA places
    the outputs in memory filled with NaN first. `q_view`: (shape, strides, offset) when q is
    the base buffer of a StridedView."""
    static = dict(static_items)

    def f(out_poison, lse_poison, q, *args):
        del out_poison, lse_poison
        if q_view is not None:
            q = jpa.StridedView(q, *q_view)
        return api_fn(q, *args, **static)

    return jax.jit(f, donate_argnums=(0, 1))


def run_poisoned(api_fn, q, args, out_dtype, **static):
    """(out, lse) of the op as device arrays; q an array or a StridedView."""
    t, hq, d = q.shape
    with jax.default_device(GPU):
        out_p = jnp.full((t, hq, d), jnp.nan, out_dtype)
        lse_p = jnp.full((t, hq), jnp.nan, jnp.float32)
    q_view = None
    if isinstance(q, jpa.StridedView):
        q_view = (tuple(q.shape), tuple(q.strides), int(q.offset))
        q = q.base
    static = dict(static, return_lse=True, out_dtype=jnp.dtype(out_dtype))
    fn = _poisoned_fn(api_fn, tuple(sorted(static.items())), q_view)
    return fn(out_p, lse_p, q, *args)


@functools.lru_cache(maxsize=None)
def _ref_fn(ref_fn, static_items):
    static = dict(static_items)
    return jax.jit(lambda q, *args: ref_fn(q, *args, out_dtype=jnp.float32, return_lse=True,
                                           **static))


def run_ref(ref_fn, q, args, **static):
    with jax.default_matmul_precision("highest"):
        out, lse = _ref_fn(ref_fn, tuple(sorted(static.items())))(q, *args)
    return np.asarray(out), np.asarray(lse)


def assert_no_nan(out, lse):
    """Every row of every (valid) request written: no NaN left from the poison, lse finite."""
    assert not bool(jnp.isnan(out).any()), "NaN in out (a row left unwritten or wrong)"
    assert bool(jnp.isfinite(lse).all()), "non-finite lse"


def compare(got_out, got_lse, want_out, want_lse, what):
    assert_close(got_out, want_out, OUT_TOL, what=f"{what} out")
    assert_close(got_lse, want_lse, LSE_TOL, what=f"{what} lse")


def rows_of(x, ranges):
    """Rows [r0, r1) of each range, concatenated (static slices)."""
    return jnp.concatenate([x[r0:r1] for r0, r1 in ranges], axis=0)


# ----------------------------------------------------------------------------- strided q


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_strided_q_of_packed_qkv_over_2gib(kind):
    d, ps = 256, 16
    T = _size(90_112, 512)
    width = (HQ + 2 * HKV) * d  # 12288 elements: a token stride of 24576 bytes
    if not SMALL:  # the last tokens' q rows start past 2^31 bytes
        assert (T - 1) * width * 2 > TWO31
    rng = np.random.default_rng(101 if kind == "decode" else 102)
    qkv = random_array(1, (T, width), jnp.bfloat16)
    qv, _, _ = jpa.split_qkv(qkv, HQ, HKV)
    P = 64 if kind == "decode" else 512
    kp = random_array(2, (P, ps, HKV, d), jnp.bfloat16)
    vp = random_array(3, (P, ps, HKV, d), jnp.bfloat16)

    if kind == "decode":
        n = 2  # 8 rows per KV head: the decode tile shape; batch T / 2 <= 65535
        B = T // n
        kv_lens = rng.integers(n, 49, size=B).astype(np.int32)
        bt = tables(rng, kv_lens, ps, np.arange(P), P, distinct=False)
        # float32 output: T * 32 * 256 * 4 bytes = 2.95e9 > 2^31
        out, lse = run_poisoned(jpa.paged_decode, qv, (kp, vp, bt, kv_lens), jnp.float32,
                                q_len_per_req=n)
        sel = [0, 1, B // 2, B - 2, B - 1]
        ranges = [(b * n, (b + 1) * n) for b in sel]
        q_sel = rows_of(qkv, ranges)[:, :HQ * d].reshape(-1, HQ, d)
        want_out, want_lse = run_ref(ref.paged_decode, q_sel,
                                     (kp, vp, bt[sel], kv_lens[sel]), q_len_per_req=n)
    else:
        B = _size(88, 4)
        ql = T // B
        q_lens = np.full(B, ql, np.int64)
        kv_lens = (q_lens + rng.integers(0, _size(257, 17), size=B)).astype(np.int32)
        cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        assert cu[-1] == T
        bt = tables(rng, kv_lens, ps, np.arange(P), P, distinct=False)
        out, lse = run_poisoned(jpa.paged_prefill, qv, (kp, vp, bt, kv_lens, cu),
                                jnp.bfloat16, max_q_len=ql)
        sel = [0, B // 2, B - 1]
        ranges = [(int(cu[b]), int(cu[b + 1])) for b in sel]
        q_sel = rows_of(qkv, ranges)[:, :HQ * d].reshape(-1, HQ, d)
        cu_sel = np.concatenate([[0], np.cumsum(q_lens[sel])]).astype(np.int32)
        want_out, want_lse = run_ref(ref.paged_prefill, q_sel,
                                     (kp, vp, bt[sel], kv_lens[sel], cu_sel), max_q_len=ql)
    assert_no_nan(out, lse)
    compare(np.asarray(rows_of(out, ranges)), np.asarray(rows_of(lse, ranges)), want_out,
            want_lse, f"{kind}, requests {sel}")


# ----------------------------------------------------------------------------- big KV pools


# name: (page dtype, layout, combined, pages); a page (half) is 16 x 8 heads x 128 = 16384
# elements, so 70000 pages of bf16 are 2.29e9 bytes (1.15e9 elements) and 135000 pages are
# 2.21e9 elements (2.21e9 bytes of fp8, 4.4e9 bytes of bf16) per K / V.
POOLS = {
    "bf16_nhd_over_2gib_bytes": ("bf16", "NHD", False, 70_000),
    "fp8_nhd_over_2g_elements": ("fp8", "NHD", False, 135_000),
    "bf16_hnd_over_2g_elements": ("bf16", "HND", False, 135_000),
    "bf16_nhd_combined_over_2g_elements": ("bf16", "NHD", True, 70_000),
    "fp8_hnd_combined_over_2g_elements": ("fp8", "HND", True, 135_000),
}


@pytest.mark.parametrize("name", list(POOLS))
def test_big_pool_far_end_decode_and_prefill(name):
    kv, layout, combined, big_pages = POOLS[name]
    P, ps, d = _size(big_pages, 4000), 16, 128
    head, tail = 8, 1200
    elems = P * ps * HKV * d * (2 if combined else 1)  # of one pool buffer
    if not SMALL:
        assert elems * _DT[kv].itemsize > TWO31
        if "elements" in name:
            assert elems > TWO31
        # the far range starts past 2^31 bytes (and elements where the name says so)
        lo_elem = (P - tail) * ps * HKV * d * (2 if combined else 1)
        assert lo_elem * _DT[kv].itemsize > TWO31 and ("bytes" in name or lo_elem > TWO31)
    kp, vp, opts = big_pool(10, P, ps, d, kv, layout, combined, (0.6, 1.7))
    sample = FarSample(P, head, tail)
    small_k, small_v = sample.pages(kp), sample.pages(vp)
    far = np.arange(P - tail, P)
    rng = np.random.default_rng(zlib.crc32(name.encode()) % 1000)

    # decode: long requests (several KV splits, so the merge kernel runs too); request 0 ends on
    # the pool's last page, request 1 starts on its first pages
    kv_lens = np.array(_size([3000, 2500, 1777, 1200, 800, 129, 17, 1],
                             [600, 500, 377, 200, 100, 29, 17, 1]), np.int32)
    bt = tables(rng, kv_lens, ps, far, P)
    bt[0, (kv_lens[0] - 1) // ps] = P - 1
    bt[1, 0], bt[1, 1] = 0, head - 1
    q = random_array(12, (len(kv_lens), HQ, d), jnp.bfloat16)
    out, lse = run_poisoned(jpa.paged_decode, q, (kp, vp, bt, kv_lens), jnp.bfloat16, **opts)
    assert_no_nan(out, lse)
    want_out, want_lse = run_ref(ref.paged_decode, q,
                                 (small_k, small_v, sample.table(bt), kv_lens), **opts)
    compare(np.asarray(out), np.asarray(lse), want_out, want_lse, "decode")

    # prefill (prepare kernel, 128-row tiles): chunked requests on far pages
    q_lens = np.array(_size([300, 1, 129], [60, 1, 29]), np.int64)
    kv_lens = (q_lens + np.array(_size([700, 2000, 0], [140, 400, 0]))).astype(np.int32)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    bt = tables(rng, kv_lens, ps, far, P)
    bt[2, (kv_lens[2] - 1) // ps] = P - 1
    q = random_array(13, (int(cu[-1]), HQ, d), jnp.bfloat16)
    max_q = int(q_lens.max())
    out, lse = run_poisoned(jpa.paged_prefill, q, (kp, vp, bt, kv_lens, cu), jnp.bfloat16,
                            max_q_len=max_q, **opts)
    assert_no_nan(out, lse)
    want_out, want_lse = run_ref(ref.paged_prefill, q,
                                 (small_k, small_v, sample.table(bt), kv_lens, cu),
                                 max_q_len=max_q, **opts)
    compare(np.asarray(out), np.asarray(lse), want_out, want_lse, "prefill")


# ----------------------------------------------------------------------------- big output


def test_prefill_output_over_2g_elements():
    d, ps = 256, 16
    B, ql = _size(528, 8), _size(512, 32)
    T = B * ql  # 270336 tokens x 32 heads x 256 = 2.21e9 elements (4.4 GB of bf16)
    if not SMALL:
        assert T * HQ * d > TWO31
    rng = np.random.default_rng(301)
    q = random_array(30, (T, HQ, d), jnp.bfloat16)
    P = 256
    kp = random_array(31, (P, ps, HKV, d), jnp.bfloat16)
    vp = random_array(32, (P, ps, HKV, d), jnp.bfloat16)
    q_lens = np.full(B, ql, np.int64)
    kv_lens = (q_lens + rng.integers(0, 17, size=B)).astype(np.int32)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    bt = tables(rng, kv_lens, ps, np.arange(P), P, distinct=False)
    out, lse = run_poisoned(jpa.paged_prefill, q, (kp, vp, bt, kv_lens, cu), jnp.bfloat16,
                            max_q_len=ql)
    assert_no_nan(out, lse)
    sel = [0, 1, B // 2, B - 2, B - 1]
    ranges = [(int(cu[b]), int(cu[b + 1])) for b in sel]
    cu_sel = np.concatenate([[0], np.cumsum(q_lens[sel])]).astype(np.int32)
    want_out, want_lse = run_ref(ref.paged_prefill, rows_of(q, ranges),
                                 (kp, vp, bt[sel], kv_lens[sel], cu_sel), max_q_len=ql)
    compare(np.asarray(rows_of(out, ranges)), np.asarray(rows_of(lse, ranges)), want_out,
            want_lse, f"prefill, requests {sel}")


# ----------------------------------------------------------------------------- append


@functools.lru_cache(maxsize=None)
def _append_fn(combined, static_items):
    static = dict(static_items)

    def f(kp, vp, qkv, slots):
        _, k, v = jpa.split_qkv(qkv, HQ, HKV)
        return jpa.append_kv(kp, vp, k, v, slots, **static)

    return jax.jit(f, donate_argnums=(0,) if combined else (0, 1))


APPENDS = {  # 135000 pages: 2.21e9 elements per K / V (4.4e9 for the combined buffer)
    "bf16_nhd": ("bf16", "NHD", False),
    "fp8_hnd_combined": ("fp8", "HND", True),
}


@pytest.mark.parametrize("name", list(APPENDS))
def test_append_far_end_of_pool_over_2g_elements(name):
    kv, layout, combined = APPENDS[name]
    P, ps, d = _size(135_000, 4000), 16, 128
    head, tail = 8, 1000
    per_page = ps * HKV * d * (2 if combined else 1)
    if not SMALL:  # every far slot's element offset is past 2^31
        assert (P - tail) * per_page > TWO31
    kp, vp, opts = big_pool(40, P, ps, d, kv, layout, combined, (0.45, 2.5))
    sample = FarSample(P, head, tail)
    before_k = np.asarray(sample.pages(kp))
    before_v = None if combined else np.asarray(sample.pages(vp))
    mid = P // 2  # pages no slot touches
    before_mid = np.asarray(kp[mid:mid + 3])

    rng = np.random.default_rng(401)
    cap = P * ps
    far_slots = (P - tail) * ps + rng.permutation(tail * ps - 1)[:250]  # distinct, not the last
    head_slots = rng.permutation(head * ps)[:20]
    bad = np.array([-1, -5, cap, cap + 5, -(2**31), 2**31 - 1], np.int64)
    slots = np.concatenate([far_slots, [cap - 1], head_slots, rng.choice(bad, 30)])
    slots = rng.permutation(slots).astype(np.int32)
    T = len(slots)
    qkv = random_array(42, (T, (HQ + 2 * HKV) * d), jnp.bfloat16, std=2.0)

    new_k, new_v = _append_fn(combined, tuple(sorted(opts.items())))(kp, vp, qkv, slots)
    assert (new_v is None) == combined

    qkv_np = np.asarray(qkv).reshape(T, HQ + 2 * HKV, d)
    case = cases.AppendCase(num_tokens=T, num_kv_heads=HKV, head_dim=d, page_size=ps,
                            num_pages=head + tail, new_dtype="bf16", kv_dtype=kv,
                            kv_layout=layout, combined=combined,
                            k_scale=opts.get("k_scale"), v_scale=opts.get("v_scale"))
    want = cases.expected_append(case, before_k, before_v, qkv_np[:, HQ:HQ + HKV],
                                 qkv_np[:, HQ + HKV:], sample.slots(slots, ps))
    assert_bitwise(np.asarray(sample.pages(new_k)), want[0], "k pages (first and last pages)")
    if not combined:
        assert_bitwise(np.asarray(sample.pages(new_v)), want[1], "v pages (first and last pages)")
    assert_bitwise(np.asarray(new_k[mid:mid + 3]), before_mid, "untouched middle pages")
