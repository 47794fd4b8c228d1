"""Quick GPU timings (DESIGN.md section 5): decode GB/s against the read ceiling measured in
the same run, causal prefill TFLOP/s, each beside the XLA reference where it is affordable.

Times with CUPTI through jax.experimental.mosaic.gpu.profiler.measure (median of the
iterations) when it is available, else wall clock over back-to-back dispatches. Inputs are
random (never zeros); KV working sets are several times the L2. Prints a table; with --json
PATH also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "tests")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import cases  # noqa: E402
import device_inputs as DI  # noqa: E402
import jax_paged_attn as jpa  # noqa: E402
from jax_paged_attn import reference as ref  # noqa: E402

GPU = jax.devices("gpu")[0]
ITERS = 20


def _measure(fn, *args):
    """Median milliseconds of fn(*args) (fn jitted)."""
    jax.block_until_ready(fn(*args))  # compile + warm up
    jax.block_until_ready(fn(*args))
    try:
        from jax.experimental.mosaic.gpu import profiler

        _, times = profiler.measure(fn, aggregate=True, iterations=ITERS)(*args)
        if times:
            return float(statistics.median(times)), "cupti"
    except Exception as e:  # noqa: BLE001
        print(f"(cupti unavailable: {type(e).__name__}: {str(e)[:120]})", flush=True)
    ts = []
    for _ in range(ITERS):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(ts)), "wall"


def read_ceiling():
    x = jax.random.normal(jax.random.PRNGKey(0), (1 << 30,), jnp.bfloat16)  # 2 GiB
    f = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
    ms, how = _measure(f, x)
    del x
    return 2 * (1 << 30) / (ms * 1e-3) / 1e9, how


def paged_inputs(B, L, q_rows, hq=32, hkv=8, d=128, ps=16, dtype="bf16", seed=0):
    """(q [q_rows, hq, d], k_pages, v_pages, block_tables, seq_lens): B requests of L
    tokens in an exactly sized pool of NHD pages (tests/device_inputs.py)."""
    kc, kq = jax.random.split(jax.random.key(seed))
    c = DI.make_paged_cache(kc, batch=B, max_len=L, num_kv_heads=hkv, head_dim=d,
                            page_size=ps, dtype=dtype)
    q = DI.random_normal(kq, (q_rows, hq, d), dtype)
    return q, c.k, c.v, c.block_tables, c.seq_lens


def decode_inputs(B, L, **kw):
    return paged_inputs(B, L, B, **kw)


def bench_decode(ceiling, rows, with_ref):
    for (B, L) in [(32, 4096), (1, 32768), (8, 8192), (128, 2048), (256, 1024)]:
        q, kp, vp, bt, sl = decode_inputs(B, L)
        nbytes = 2 * B * L * 8 * 128 * 2 + 2 * q.size * 2
        f = jax.jit(lambda q, kp, vp, bt, sl: jpa.paged_decode(q, kp, vp, bt, sl))
        ms, how = _measure(f, q, kp, vp, bt, sl)
        gbs = nbytes / (ms * 1e-3) / 1e9
        row = dict(op="decode", shape=f"B={B} L={L}", impl="jpa", ms=ms, gbs=gbs,
                   frac=gbs / ceiling, timer=how)
        rows.append(row)
        if with_ref and (B, L) == (32, 4096):
            fr = jax.jit(lambda q, kp, vp, bt, sl: ref.paged_decode(q, kp, vp, bt, sl))
            rms, rhow = _measure(fr, q, kp, vp, bt, sl)
            rgbs = nbytes / (rms * 1e-3) / 1e9
            rows.append(dict(op="decode", shape=f"B={B} L={L}", impl="xla-ref", ms=rms,
                             gbs=rgbs, frac=rgbs / ceiling, timer=rhow))
            row["vs_ref"] = rms / ms
        del q, kp, vp, bt, sl


def bench_prefill(rows, with_ref):
    for (B, S) in [(4, 2048), (1, 8192)]:
        hq, d = 32, 128
        q, kp, vp, bt, sl = paged_inputs(B, S, B * S, hq=hq, d=d, seed=1)
        cu = jnp.asarray(cases.cu_seqlens(np.full(B, S)).astype(np.int32))
        flops = 4 * B * (S * (S + 1) / 2) * hq * d
        for tile_rows in ("", "64"):  # default shape (128 rows), then the 64-row shape
            os.environ["JPA_CUDA_TILE_ROWS"] = tile_rows
            f = jax.jit(lambda *a: jpa.paged_prefill(*a, max_q_len=S))
            ms, how = _measure(f, q, kp, vp, bt, sl, cu)
            r = dict(op="prefill", shape=f"B={B} S={S} causal", impl="jpa" + (
                f"/rows{tile_rows}" if tile_rows else ""), ms=ms,
                tflops=flops / (ms * 1e-3) / 1e12, timer=how)
            rows.append(r)
            if not tile_rows:
                row = r
        os.environ.pop("JPA_CUDA_TILE_ROWS", None)
        if with_ref and (B, S) == (4, 2048):
            fr = jax.jit(lambda *a: ref.paged_prefill(*a, max_q_len=S))
            rms, rhow = _measure(fr, q, kp, vp, bt, sl, cu)
            rows.append(dict(op="prefill", shape=f"B={B} S={S} causal", impl="xla-ref", ms=rms,
                             tflops=flops / (rms * 1e-3) / 1e12, timer=rhow))
            row["vs_ref"] = rms / ms


def kernel_breakdown(B, L):
    """Per-kernel CUPTI times of a decode shape (prepare / tiles / merge)."""
    try:
        from jax.experimental.mosaic.gpu import profiler

        q, kp, vp, bt, sl = decode_inputs(B, L)
        f = jax.jit(lambda q, kp, vp, bt, sl: jpa.paged_decode(q, kp, vp, bt, sl))
        jax.block_until_ready(f(q, kp, vp, bt, sl))
        _, per = profiler.measure(f, aggregate=False)(q, kp, vp, bt, sl)
        return [(name[:90], t * 1e3) for name, t in per]
    except Exception as e:  # noqa: BLE001
        return [(f"unavailable: {type(e).__name__}", math.nan)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-ref", action="store_true")
    a = ap.parse_args()
    print(f"device: {GPU.device_kind}", flush=True)
    ceiling, how = read_ceiling()
    print(f"read ceiling (2 GiB bf16 sum): {ceiling:.0f} GB/s [{how}]", flush=True)
    rows = []
    bench_decode(ceiling, rows, not a.no_ref)
    bench_prefill(rows, not a.no_ref)
    for B, L in ((32, 4096), (1, 32768)):
        print(f"kernel breakdown, decode B={B} L={L} (us):")
        for name, us in kernel_breakdown(B, L):
            print(f"  {us:9.1f}  {name}")
    print(f"{'op':8s} {'shape':22s} {'impl':11s} {'ms':>9s} {'GB/s':>8s} {'ceil%':>6s} "
          f"{'TFLOP/s':>8s} {'x ref':>6s}")
    for r in rows:
        print(f"{r['op']:8s} {r['shape']:22s} {r['impl']:11s} {r['ms']:9.4f} "
              f"{r.get('gbs', float('nan')):8.0f} {100 * r.get('frac', float('nan')):6.1f} "
              f"{r.get('tflops', float('nan')):8.1f} {r.get('vs_ref', float('nan')):6.2f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(device=GPU.device_kind, read_ceiling_gbs=ceiling, rows=rows), fh,
                      indent=1)


if __name__ == "__main__":
    main()
