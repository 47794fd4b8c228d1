"""Generation throughput: the paged, continuously batched engine (examples/engine.py) against
a dense-cache baseline (examples/dense_engine.py: per-slot KV caches padded to the longest
sequence, `jax.nn.dot_product_attention`), same model and weights, same requests, one run.

    python benchmarks/bench_generate.py                 # Llama-3-8B shapes, 64 requests
    python benchmarks/bench_generate.py --smoke         # tiny model on the CPU

Default workload (issue: "a model that generates"): 32 layers, hidden 4096, Hq=32 Hkv=8
D=128, MLP 14336, bf16, random weights; 64 concurrent requests, prompts U[128, 4096],
outputs U[64, 512]. Both engines are warmed up first (compilation excluded). Reports generated tokens/s of both and their ratio, TTFT p50/p99 and
inter-token latency, and attention's share of a decode step: the step's time against the
same step's attention calls alone (paged_decode of the step's batch, once per layer, each
on its own layer of the stacked cache), and by CUPTI the attention kernels inside the step
against the same kernels alone. Writes generate.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(_ROOT, "examples"), _ROOT]

import common as C  # noqa: E402
import dense_engine  # noqa: E402
import engine  # noqa: E402
import llama  # noqa: E402

import jax_paged_attn as jpa  # noqa: E402


def make_requests(rng, n, prompt, output, vocab):
    return [engine.Request(rid=i, prompt=rng.integers(0, vocab, int(rng.integers(
        prompt[0], prompt[1] + 1))).tolist(), max_new=int(rng.integers(output[0],
                                                                        output[1] + 1)))
            for i in range(n)]


def warm_up(eng, prompt, vocab):
    """Compiles everything the timed run uses (the dense baseline compiles one prefill per
    power-of-two bucket) on the same engine, then clears its records."""
    if hasattr(eng, "compile_buckets"):
        eng.compile_buckets()
    lengths, n = [], 16
    while n // 2 < prompt[1]:
        lengths.append(max(prompt[0], min(n, prompt[1])))
        n *= 2
    for i, n in enumerate(sorted(set(lengths))):
        eng.submit(engine.Request(rid=-1 - i, prompt=[1] * n, max_new=2))
    while not eng.idle():
        eng.step(now=float("inf"))
    eng.finished.clear()
    eng.steps = 0


def drive(eng, requests):
    for r in requests:
        eng.submit(r)
    t0 = time.perf_counter()
    while not eng.idle():
        eng.step(now=float("inf"))
    wall = time.perf_counter() - t0
    gen = sum(len(r.output) for r in eng.finished)
    ttft = [r.token_times[0] - t0 for r in eng.finished]
    itl = [b - a for r in eng.finished for a, b in zip(r.token_times, r.token_times[1:])]
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")  # noqa: E731
    return dict(wall_s=wall, generated=gen, tokens_per_s=gen / wall, steps=eng.steps,
                ttft_p50_s=pct(ttft, 50), ttft_p99_s=pct(ttft, 99), itl_p50_s=pct(itl, 50),
                itl_p99_s=pct(itl, 99))


# Our attention kernels (not append_kv_kernel): what a step's attention costs on the GPU.
_ATTN_KERNELS = ("attn_prepare_kernel", "attn_tile_kernel", "attn_merge_kernel",
                 "prefill_wgmma_kernel")


def _attention_kernel_s(timer, fn, args):
    """Seconds of our attention kernels in one call of `fn(*args)` (CUPTI), or None where
    CUPTI is not available (the CPU). The profiler traces `fn` under jit: the arrays must
    come in as `args`, since arrays a closure holds would be lowered as constants (the
    model's weights: tens of GB)."""
    kernels = timer.kernels(fn, args, limit=None)
    if kernels is None:
        return None
    return sum(us for name, us in kernels if any(k in name for k in _ATTN_KERNELS)) * 1e-6


def attention_share(cfg, eng_args, batch, ctx, reps, params):
    """A decode step of `batch` requests of `ctx` cached tokens each, as the engine runs it
    (its decode-only step): dict of the step's time, the time of the same attention calls
    alone (paged_decode of the step's batch, once per layer, each on its own layer of the
    stacked cache; wall clock), and, by CUPTI, the attention kernels' time inside the step
    against theirs alone (issue: a decode step's attention within 1.1x the isolated
    kernels)."""
    ps = eng_args["page_size"]
    pages_per = -(-(ctx + 1) // ps)
    eng = engine.Engine(params, cfg, **dict(eng_args, num_pages=batch * pages_per,
                                            max_batch=batch, token_budget=batch))
    table = np.arange(batch * pages_per, dtype=np.int32).reshape(batch, pages_per)
    tokens = jnp.zeros((batch,), jnp.int32)
    start = jnp.full((batch,), ctx, jnp.int32)
    one = jnp.ones((batch,), jnp.int32)

    def timed(call):
        jax.block_until_ready(call())
        t = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            t.append(time.perf_counter() - t0)
        return float(np.median(t))

    caches = [eng.k_cache, eng.v_cache]      # donated to each step, so carried along
    bt = jnp.asarray(table)

    def step_args():
        return (eng.params, caches[0], caches[1], tokens, bt, start, one)

    def one_step():
        sampled, caches[0], caches[1] = eng._decode_step(*step_args())
        return sampled

    step = timed(one_step)
    timer = C.Timer(reps=1)
    step_attn_k = _attention_kernel_s(timer, lambda *a: eng._decode_step(*a)[0], step_args())
    # Attention alone: one decode call per layer on that layer of the stack.
    q = jax.random.normal(jax.random.key(1), (batch, cfg.heads, cfg.head_dim), cfg.dtype)

    @jax.jit
    def attn_only(q, kc, vc, bt, sl):
        def body(acc, i):
            return acc + jpa.paged_decode(q, kc, vc, bt, sl, layer=i).astype(jnp.float32), None
        return jax.lax.scan(body, jnp.zeros(q.shape, jnp.float32),
                            jnp.arange(cfg.layers, dtype=jnp.int32))[0]

    alone_args = (q, caches[0], caches[1], bt, start + 1)   # the caches after the steps
    attn = timed(lambda: attn_only(*alone_args))
    alone_k = _attention_kernel_s(timer, attn_only, alone_args)
    out = dict(batch=batch, ctx=ctx, step_s=step, attention_s=attn,
               attention_share=attn / step)
    if step_attn_k is not None and alone_k:
        out.update(step_attention_kernels_s=step_attn_k, alone_attention_kernels_s=alone_k,
                   step_vs_alone=step_attn_k / alone_k)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model and workload (CPU)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--slots", type=int, default=64, help="concurrent requests")
    ap.add_argument("--budget", type=int, default=2048, help="paged engine tokens per step")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--tp", type=int, default=1,
                    help="tensor-parallel degree of the paged engine (the baseline stays on one "
                         "device)")
    ap.add_argument("--out", default=os.environ.get("OUT", "./out"))
    args = ap.parse_args(argv)
    if args.smoke:
        cfg, prompt, output = llama.Config(), (4, 40), (2, 12)
        args.requests, args.slots, args.budget, args.chunk = 6, 4, 32, 16
    else:
        cfg, prompt, output = llama.LLAMA3_8B, (128, 4096), (64, 512)
    max_len = prompt[1] + output[1]
    params = llama.init_params(cfg, jax.random.key(0))
    pages = args.slots * -(-max_len // args.page_size)
    eng_args = dict(page_size=args.page_size, max_seq_len=max_len, chunk=args.chunk)
    report = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                  date=time.strftime("%Y-%m-%d"), config=str(cfg), requests=args.requests)

    os.makedirs(args.out, exist_ok=True)

    def phase(name, value):
        """Record one phase and rewrite generate.json, so a run cut short keeps its part."""
        report[name] = value
        with open(os.path.join(args.out, "generate.json"), "w") as f:
            json.dump(report, f, indent=1)
        print(f"[{time.perf_counter() - t_start:7.1f} s] {name}: {value}", flush=True)

    t_start = time.perf_counter()
    rng = np.random.default_rng(0)
    mesh = llama.tp_mesh(args.tp)
    report["tp"] = args.tp
    paged = engine.Engine(params, cfg, num_pages=pages, max_batch=args.slots,
                          token_budget=args.budget, mesh=mesh, **eng_args)
    warm_up(paged, prompt, cfg.vocab)
    phase("paged", drive(paged, make_requests(rng, args.requests, prompt, output, cfg.vocab)))
    del paged
    ctx = (prompt[0] + prompt[1]) // 2
    phase("decode_step", attention_share(cfg, eng_args, args.slots, ctx,
                                         3 if args.smoke else 10, params))
    if not args.skip_baseline:
        rng = np.random.default_rng(0)
        dense = dense_engine.DenseEngine(params, cfg, slots=args.slots, max_seq_len=max_len)
        warm_up(dense, prompt, cfg.vocab)
        phase("dense", drive(dense, make_requests(rng, args.requests, prompt, output,
                                                  cfg.vocab)))
        del dense
        phase("speedup", report["paged"]["tokens_per_s"] / report["dense"]["tokens_per_s"])
    for name in ("paged", "dense"):
        if name in report:
            r = report[name]
            print(f"{name:6s} {r['tokens_per_s']:9.1f} tok/s  {r['generated']} tokens in "
                  f"{r['wall_s']:.1f} s  TTFT p50/p99 {r['ttft_p50_s'] * 1e3:.0f}/"
                  f"{r['ttft_p99_s'] * 1e3:.0f} ms  ITL p50/p99 {r['itl_p50_s'] * 1e3:.1f}/"
                  f"{r['itl_p99_s'] * 1e3:.1f} ms")
    if "speedup" in report:
        print(f"paged / dense tokens/s: {report['speedup']:.2f}x (target >= 1.5x)")
    d = report["decode_step"]
    print(f"decode step B={d['batch']} ctx={d['ctx']}: {d['step_s'] * 1e3:.2f} ms, attention "
          f"alone {d['attention_s'] * 1e3:.2f} ms ({100 * d['attention_share']:.0f}% of the "
          f"step)")
    if "step_vs_alone" in d:
        print(f"attention kernels in the step {d['step_attention_kernels_s'] * 1e3:.2f} ms, "
              f"alone {d['alone_attention_kernels_s'] * 1e3:.2f} ms: "
              f"{d['step_vs_alone']:.2f}x (target <= 1.1x)")


if __name__ == "__main__":
    main()
