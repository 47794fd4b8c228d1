"""Random paged-attention values drawn on a device with ``jax.random``: the device half of
``cases.py``, for sizes where numpy generation and the host-to-device copy would be slow.

One builder for the GPU suite (``make_big``), ``scripts/bench_gpu.py``,
``scripts/ncu_points.py`` and every benchmark (``make_paged_cache``, ``random_normal``,
``dense_kv``). The metadata (lengths, rows, block tables with garbage in never-needed
entries, the exact pool the benchmarks' cuDNN peer needs, keyword options) always comes from
``cases.py``, so a large GPU case and a small CPU case differ only in where their values are
drawn. The values here follow ``cases.py``: normal in float32 (std 1, 1.5 for fp8 pages, or
the caller's), exact zeros nudged to 0.125, then cast to the dtype (names as in
``cases.DTYPES``: f32, f16, bf16, fp8; a numpy / jnp dtype also works).

Why in tests/: the metadata oracle (cases.py) lives here and the test suite must not import
benchmark code; benchmarks and scripts are programs that already set ``sys.path`` (as
``scripts/sanitizer_cases.py`` does for ``cases``), so they add this directory and
``import device_inputs``. pytest finds it through tests/conftest.py. Like cases.py it does not
import jax_paged_attn, so a broken build fails the op under test, not the input builder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

import cases


def _dtype(dt) -> np.dtype:
    return cases.DTYPES[dt] if isinstance(dt, str) else np.dtype(dt)


def _on(device):
    return jax.default_device(device) if device is not None else contextlib.nullcontext()


def _draw(key, shape, dtype, std, mean):
    x = jax.random.normal(key, shape, jnp.float32) * std + mean
    return jnp.where(x == 0, 0.125, x).astype(dtype)  # never an exact zero


_STATIC = ("shape", "dtype", "std", "mean")
_normal = jax.jit(_draw, static_argnames=_STATIC)
# One draw per key, written into the stacked output (peak memory: the output + one slice).
_normal_stack = jax.jit(
    lambda keys, shape, dtype, std, mean: jax.lax.map(
        lambda k: _draw(k, shape, dtype, std, mean), keys),
    static_argnames=_STATIC)


def random_normal(key, shape, dtype="bf16", *, std=1.0, mean=0.0, stack=None, device=None):
    """N(mean, std^2) in float32, exact zeros nudged to 0.125, cast to ``dtype``: one jitted
    draw (no float32 copy left behind) on ``device`` (the default device when None).
    ``stack``: a leading [stack] axis, each slice drawn from its own key."""
    shape = tuple(int(n) for n in shape)
    static = dict(shape=shape, dtype=_dtype(dtype), std=float(std), mean=float(mean))
    with _on(device):
        if stack is None:
            x = _normal(key, **static)
        else:
            x = _normal_stack(jax.random.split(key, stack), **static)
    return jax.device_put(x, device) if device is not None else x


def random_pages(key, num_pages, page_size, num_kv_heads, head_dim, kv_dtype="bf16", *,
                 kv_layout="NHD", combined=False, std=None, layers=None, device=None):
    """(k_pages, v_pages) of fresh random values in the physical layout of ``kv_layout``
    ("NHD" [P, page, Hkv, D] or "HND" [P, Hkv, page, D]); ``combined``: one [P, 2, ...]
    array and v_pages None; ``layers``: a leading [layers] axis (a stacked cache). ``std``
    defaults to cases.make_pages' (1.5 for fp8, else 1)."""
    if std is None:
        std = 1.5 if _dtype(kv_dtype) == cases.DTYPES["fp8"] else 1.0
    if kv_layout == "NHD":
        page = (page_size, num_kv_heads, head_dim)
    elif kv_layout == "HND":
        page = (num_kv_heads, page_size, head_dim)
    else:
        raise ValueError(kv_layout)
    draw = functools.partial(random_normal, dtype=kv_dtype, std=std, stack=layers,
                             device=device)
    if combined:
        return draw(key, (num_pages, 2) + page), None
    kk, kv = jax.random.split(key)
    return draw(kk, (num_pages,) + page), draw(kv, (num_pages,) + page)


# ----------------------------------------------------------------------------- test cases


def make_big(kind, *, batch, hkv, group, d, ps, q="bf16", kv="bf16", max_kv, min_kv=None,
             n=1, q_lens=None, layout="NHD", combined=False, seed=0, pad_front=0, pad_back=0,
             max_q_len_slack=0, extra_cols=1, device=None, **opts) -> cases.Inputs:
    """Like cases.make_inputs at large sizes: pages and q drawn on ``device``; lengths from
    ``cases.long_lengths`` (decode: in [max(n, min_kv), max_kv], the first max_kv; prefill:
    ``q_lens`` over a random context), metadata and options as in cases.py. opts: the
    AttnCase options (window_left, logits_soft_cap, sinks, scale, k_scale, v_scale,
    out_dtype, causal, return_lse). k_logical / v_logical are None."""
    case = cases.AttnCase(kind=kind, batch=batch, num_kv_heads=hkv, group=group, head_dim=d,
                          page_size=ps, q_dtype=q, kv_dtype=kv, kv_layout=layout,
                          combined=combined, max_kv_len=max_kv, q_len_per_req=n,
                          max_q_len_slack=max_q_len_slack, pad_front=pad_front,
                          pad_back=pad_back, seed=seed, **opts)
    rng = np.random.default_rng(seed)
    ql, kv_lens = cases.long_lengths(rng, case, q_lens=q_lens, min_kv=min_kv)
    meta = cases.make_metadata(rng, case, ql, kv_lens, extra_cols=extra_cols)
    kpages, kq = jax.random.split(jax.random.key(seed))
    kp, vp = random_pages(kpages, meta.num_pages, ps, hkv, d, kv, kv_layout=layout,
                          combined=combined, device=device)
    qa = random_normal(kq, (meta.num_tokens, case.num_q_heads, d), q, device=device)
    return cases.assemble_inputs(case, rng, meta, qa, kp, vp)


# ----------------------------------------------------------------------------- benchmarks


@dataclasses.dataclass
class PagedCache:
    """One paged KV cache in NHD layout [P, page, Hkv, D] (with ``layers``: [layers, P, ...]),
    pool sized exactly B x n pages (n = ceil(max_len / page)), pages of each request a random
    permutation of the pool (cases.pool_block_tables)."""
    k: jax.Array
    v: jax.Array
    block_tables: jax.Array      # int32 [B, n]
    seq_lens: jax.Array          # int32 [B]
    page_size: int
    k_scale: float | None = None  # fp8 only
    v_scale: float | None = None
    k_deq: jax.Array | None = None  # fp8 only: the same values dequantized to bf16
    v_deq: jax.Array | None = None

    @property
    def num_pages(self) -> int:
        return int(self.k.shape[-4])

    @property
    def pages_per_req(self) -> int:
        return int(self.block_tables.shape[1])

    def arrays(self):
        return [self.k, self.v, self.block_tables, self.seq_lens, self.k_deq, self.v_deq]


def make_paged_cache(key, *, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                     page_size: int, dtype: str = "bf16", seq_lens=None,
                     fp8_scale: float = 0.5, layers: int | None = None,
                     device=None) -> PagedCache:
    """Fresh random paged cache: N(0,1) pages in ``dtype``, every request ``max_len`` tokens
    of table (seq_lens default max_len). With dtype "fp8", pages hold N(0,1)/scale in
    float8_e4m3fn, k_scale = v_scale = fp8_scale (a power of two, so fp8 * scale is exact in
    bf16), and k_deq/v_deq carry those dequantized values in bf16 for peers without fp8. The
    table is drawn by numpy from the key's bits, the values by jax.random from the key."""
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
    bt, num_pages = cases.pool_block_tables(rng, batch, max_len, page_size)
    if seq_lens is None:
        seq_lens = np.full((batch,), max_len, np.int32)
    with _on(device):
        bt = jnp.asarray(bt)
        seq_lens = jnp.asarray(np.asarray(seq_lens, np.int32))
    fp8 = dtype == "fp8"
    k, v = random_pages(key, num_pages, page_size, num_kv_heads, head_dim, dtype,
                        std=1.0 / fp8_scale if fp8 else 1.0, layers=layers, device=device)
    if fp8:
        cache = PagedCache(k, v, bt, seq_lens, page_size, fp8_scale, fp8_scale,
                           dequantize(k, fp8_scale), dequantize(v, fp8_scale))
    else:
        cache = PagedCache(k, v, bt, seq_lens, page_size)
    jax.block_until_ready([a for a in cache.arrays() if a is not None])
    return cache


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize(pages, scale, dtype=jnp.bfloat16):
    """pages * scale in ``dtype`` (fp8 pages for peers without fp8)."""
    return (pages.astype(jnp.float32) * scale).astype(dtype)


@jax.jit
def dense_kv(pages, block_tables):
    """[B, n*page, Hkv, D] contiguous copy of each request's NHD pages (for dense peers)."""
    g = pages[block_tables]                        # [B, n, page, Hkv, D]
    b, n, p, h, d = g.shape
    return g.reshape(b, n * p, h, d)
