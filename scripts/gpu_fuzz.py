"""Fuzz the CUDA kernels against the reference with the CPU suite's generator (tests/fuzz.py).

    python3 scripts/gpu_fuzz.py --cases 600 --out $OUT          # random configs on the GPU
    python3 scripts/gpu_fuzz.py --cases 100 --big-pool-gib 2.5  # pools past 2^31 bytes
    python3 scripts/gpu_fuzz.py --repro 17:3                    # one case again
    python3 scripts/gpu_fuzz.py --cpu --cases 200               # same driver, CPU FFI path

Draws `--draws` runtime cases per static config (GPU head dims 64/128/256, bf16/f16 q,
bf16/f16/fp8 pages), runs ours on the GPU and the float32 reference (on the GPU too unless
--ref-cpu), and checks every case as the CPU suite does. `--big-pool-gib G` puts each case's
pages at the far end of a pool of at least G GiB (random filler made on the device), so page
offsets pass 2^31 bytes (and 2^31 elements for G > 2 with fp8 or G > 4 with 16-bit pages).
Every failure is appended to <out>/fuzz_failures.jsonl as {"config", "draw", "error"}, a
line `--repro config:draw` reruns; the exit code is 1 when any case failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback

import numpy as np

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "tests")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import cases  # noqa: E402
import fuzz  # noqa: E402
import jax_paged_attn as jpa  # noqa: E402
from conftest import assert_close  # noqa: E402
from jax_paged_attn import reference as ref  # noqa: E402

OPS = {"decode": (jpa.paged_decode, ref.paged_decode),
       "prefill": (jpa.paged_prefill, ref.paged_prefill)}


def _placer(device):
    def put(x):
        if isinstance(x, (np.ndarray, np.generic)):
            return jax.device_put(x, device)
        return x
    return put


def _grow_pool(case, gib, put):
    """The case with its pool placed at the far end of >= `gib` GiB of random pages."""
    cfg, inp = case.config, case.inputs
    page_bytes = inp.k_logical[0].nbytes
    extra = max(0, int(gib * 2**30) // page_bytes - cfg.num_pages)
    bt = np.asarray(inp.block_tables, np.int64)
    inside = (bt >= 0) & (bt < cfg.num_pages)
    bt = np.where(inside, bt + extra, bt)          # out-of-range entries stay out of range
    grown = dataclasses.replace(cfg, num_pages=cfg.num_pages + extra)
    return dataclasses.replace(case, config=grown,
                               inputs=inp.with_args(block_tables=bt.astype(np.int32))), extra


class _BigPages:
    """Page operands of a grown case: device-made filler pages, then the case's pages."""

    def __init__(self, case, extra, device):
        self.key = jax.random.PRNGKey(case.config_seed * 1000 + case.draw_seed)
        self.extra, self.device = extra, device

    def __call__(self, case, put):
        c = case.config.case
        k, v = fuzz.cases.pack_pages(case.inputs.k_logical, case.inputs.v_logical,
                                     c.kv_layout, c.combined)

        def grow(x, key):
            if x is None:
                return None
            with jax.default_device(self.device):
                filler = jax.random.normal(key, (self.extra,) + x.shape[1:], jnp.float32)
                return jnp.concatenate([filler.astype(x.dtype), put(x)])

        k1, k2 = jax.random.split(self.key)
        return grow(k, k1), grow(v, k2)


def run_one(config_seed, draw, args, dev, ref_dev):
    case = fuzz.draw_case(config_seed, draw, gpu=not args.cpu)
    put, ref_put = _placer(dev), _placer(ref_dev)
    pages = None
    if args.big_pool_gib:
        if case.config.num_layers:
            case = dataclasses.replace(case, config=dataclasses.replace(
                case.config, num_layers=0, traced_layer=False), layer=0)
        case, extra = _grow_pool(case, args.big_pool_gib, put)
        pages = _BigPages(case, extra, dev)
    ours, oracle = OPS[case.config.case.kind]
    out, lse = fuzz.run(case, ours, jpa, put, pages=pages)
    r_out, r_lse = fuzz.run(case, oracle, jpa, ref_put, float32_oracle=True,
                            pages=None if pages is None or ref_dev != dev else pages)
    c = case.config.case
    tols = None if args.cpu else cases.gpu_tolerances(c.q_dtype, c.kv_dtype, c.out_dtype)
    fuzz.check(case, out, lse, r_out, r_lse, assert_close, tols)
    return case


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=600)
    ap.add_argument("--draws", type=int, default=10, help="runtime draws per static config")
    ap.add_argument("--seed", type=int, default=10_000, help="first config seed")
    ap.add_argument("--repro", help="config:draw of one case to rerun")
    ap.add_argument("--cpu", action="store_true", help="run ours on the CPU FFI path")
    ap.add_argument("--ref-cpu", action="store_true", help="run the reference on the CPU")
    ap.add_argument("--big-pool-gib", type=float, default=0.0)
    ap.add_argument("--out", default=os.environ.get("OUT", "./out"))
    args = ap.parse_args()
    dev = jax.devices("cpu" if args.cpu else "gpu")[0]
    ref_dev = jax.devices("cpu")[0] if args.ref_cpu else dev
    os.makedirs(args.out, exist_ok=True)
    failures_path = os.path.join(args.out, "fuzz_failures.jsonl")
    if args.repro:
        c, d = (int(x) for x in args.repro.split(":"))
        todo = [(c, d)]
    else:
        todo = [(args.seed + i // args.draws, i % args.draws) for i in range(args.cases)]
    t0, failed = time.time(), 0
    with open(failures_path, "a") as log:
        for i, (c, d) in enumerate(todo):
            try:
                run_one(c, d, args, dev, ref_dev)
            except Exception as e:  # noqa: BLE001 - every failure is recorded, then we go on
                failed += 1
                msg = "".join(traceback.format_exception_only(type(e), e)).strip()
                log.write(json.dumps({"config": c, "draw": d, "big_pool_gib": args.big_pool_gib,
                                      "error": msg[:2000]}) + "\n")
                log.flush()
                print(f"FAIL --repro {c}:{d}: {msg[:300]}", flush=True)
            if (i + 1) % 50 == 0:
                print(f"{i + 1}/{len(todo)} cases, {failed} failed, {time.time() - t0:.0f} s",
                      flush=True)
    print(f"gpu_fuzz: {len(todo)} cases on {dev.platform}, {failed} failed "
          f"(big pool {args.big_pool_gib} GiB), {time.time() - t0:.0f} s; failures: "
          f"{failures_path}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
