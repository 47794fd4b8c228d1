"""Generate with a Llama-style model (random weights) through jax_paged_attn, continuously
batched: requests arrive over time with their own prompt and output lengths; each step packs
decode tokens and prefill chunks up to a token budget (engine.py).

    python examples/generate.py                      # tiny model, runs on the CPU in seconds
    python examples/generate.py --model 8b --requests 64 --prompt 128 4096 --output 64 512 \\
        --pages 40000 --budget 2048 --chunk 512       # Llama-3-8B shapes on one GPU

Prints a progress line while it runs; at the end tokens/s, time to first token (p50/p99) and
inter-token latency. Real weights load through `llama.load_params` (e.g. from safetensors).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import engine  # noqa: E402
import llama  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("tiny", "8b"), default="tiny")
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--prompt", type=int, nargs=2, default=(8, 64), metavar=("MIN", "MAX"))
    ap.add_argument("--output", type=int, nargs=2, default=(8, 32), metavar=("MIN", "MAX"))
    ap.add_argument("--rate", type=float, default=0.0,
                    help="mean arrivals per second (Poisson); 0: all at the start")
    ap.add_argument("--pages", type=int, default=256)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--budget", type=int, default=64, help="tokens per step")
    ap.add_argument("--chunk", type=int, default=32, help="largest prefill chunk")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tp", type=int, default=1,
                    help="tensor-parallel degree (heads and MLP split over that many devices)")
    args = ap.parse_args(argv)

    cfg = llama.LLAMA3_8B if args.model == "8b" else llama.Config()
    params = llama.init_params(cfg, jax.random.PRNGKey(args.seed))
    rng = np.random.default_rng(args.seed)
    max_len = args.prompt[1] + args.output[1]
    eng = engine.Engine(params, cfg, num_pages=args.pages, page_size=args.page_size,
                        max_batch=args.max_batch, token_budget=args.budget,
                        max_seq_len=max_len, chunk=args.chunk, mesh=llama.tp_mesh(args.tp))
    arrival = 0.0
    for i in range(args.requests):
        if args.rate > 0:
            arrival += rng.exponential(1.0 / args.rate)
        eng.submit(engine.Request(
            rid=i, prompt=rng.integers(0, cfg.vocab, int(rng.integers(*args.prompt) + 1))
            .tolist(), max_new=int(rng.integers(args.output[0], args.output[1] + 1)),
            arrival=arrival))
    arrivals = {r.rid: r.arrival for r in eng.waiting}

    t0 = time.perf_counter()
    processed = generated = 0
    last_print = t0
    while not eng.idle():
        now = time.perf_counter() - t0
        n = eng.step(now=now)
        if n == 0:
            time.sleep(0.001)
            continue
        processed += n
        generated = sum(len(r.output) for r in eng.running + eng.finished)
        if time.perf_counter() - last_print > 1.0 or eng.idle():
            last_print = time.perf_counter()
            print(f"\rstep {eng.steps:5d}  running {len(eng.running):3d}  waiting "
                  f"{len(eng.waiting):3d}  done {len(eng.finished):3d}/{args.requests}  "
                  f"tokens out {generated:6d}  free pages {eng.alloc.free_pages:6d}",
                  end="", flush=True)
    wall = time.perf_counter() - t0
    print()
    ttft = [r.token_times[0] - t0 - arrivals[r.rid] for r in eng.finished]
    itl = [b - a for r in eng.finished for a, b in zip(r.token_times, r.token_times[1:])]
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1e3 if xs else float("nan")  # noqa
    print(f"{len(eng.finished)} requests, {generated} tokens generated, {processed} tokens "
          f"processed in {eng.steps} steps, {wall:.2f} s: {generated / wall:.1f} tokens/s")
    print(f"time to first token p50 {pct(ttft, 50):.1f} ms, p99 {pct(ttft, 99):.1f} ms; "
          f"inter-token latency p50 {pct(itl, 50):.1f} ms, p99 {pct(itl, 99):.1f} ms "
          f"(the first step includes compilation)")


if __name__ == "__main__":
    main()
