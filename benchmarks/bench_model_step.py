"""Decode attention inside a model step: one jitted step scans `--layers` layers of paged
decode over a stacked cache. Reports the time per layer against the isolated kernel (same
shapes, same run) and whether XLA put our custom call into a CUDA graph (command buffer).

  python3 benchmarks/bench_model_step.py --out OUT [--layers 32 --batch 32 --len 4096]
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

import jax_paged_attn as jpa  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 16


def command_buffer_report(hlo: str) -> dict:
    """Where the custom call sits in the optimized HLO: inside a command-buffer computation
    (captured as a CUDA graph) or not, and what copies or slices XLA placed around it."""
    comps = re.split(r"\n(?=\S.*\{\s*$)", hlo)  # one chunk per computation
    in_cb = any("jpa_paged_decode" in c and "command_buffer" in c.split("\n", 1)[0]
                for c in comps)
    return {
        "custom_call_in_command_buffer": in_cb,
        "command_buffers": len(re.findall(r"^\S*command_buffer\S*\s", hlo, re.M)),
        "copies": len(re.findall(r"= \S+ copy\(", hlo)),
        "dynamic_slices": len(re.findall(r"dynamic-slice\(", hlo)),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--len", type=int, default=4096)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not C.on_gpu():
        args.layers, args.batch, args.len, args.reps = 2, 2, 64, 3
    outdir = C.out_dir(args.out)
    timer = C.Timer(reps=args.reps)
    C.log(f"device: {C.device_info()}; timer CUPTI {timer.cupti_status}")

    key = jax.random.PRNGKey(0)
    caches = [C.make_paged_cache(jax.random.fold_in(key, i), batch=args.batch,
                                 max_len=args.len, num_kv_heads=HKV, head_dim=D,
                                 page_size=PAGE) for i in range(args.layers)]
    k_stack = jnp.stack([c.k for c in caches])
    v_stack = jnp.stack([c.v for c in caches])
    bt, sl = caches[0].block_tables, caches[0].seq_lens
    del caches
    q_stack = C.random_array(jax.random.fold_in(key, 999), (args.layers, args.batch, HQ, D))

    def step(q_stack, k_stack, v_stack, bt, sl):
        def layer(carry, xs):
            q, k, v = xs
            # A residual-style dependency, as between the layers of a model.
            out = jpa.paged_decode(q + carry.astype(q.dtype), k, v, bt, sl)
            return out * 0.5, out
        _, outs = jax.lax.scan(layer, jnp.zeros_like(q_stack[0]), (q_stack, k_stack, v_stack))
        return outs

    step_jit = jax.jit(step)
    step_args = (q_stack, k_stack, v_stack, bt, sl)
    hlo = step_jit.lower(*step_args).compile().as_text()
    report = command_buffer_report(hlo)
    jax.block_until_ready(step_jit(*step_args))
    t_step = timer.time(step_jit, step_args)

    iso = jax.jit(lambda q, k, v, bt, sl: jpa.paged_decode(q, k, v, bt, sl))
    # Rotate over the layers' caches so the isolated kernel is not served from L2 either.
    sets = [(q_stack[i], k_stack[i], v_stack[i], bt, sl) for i in range(min(args.layers, 4))]
    iso_multi = C.multi_call(lambda *a: iso(*a))
    jax.block_until_ready(iso_multi(*sets))
    t_iso = timer.time(iso_multi, sets, ops_per_call=len(sets))

    per_layer = t_step.us / args.layers
    result = {"layers": args.layers, "batch": args.batch, "len": args.len,
              "step_us": t_step.us, "per_layer_us": per_layer, "isolated_us": t_iso.us,
              "ratio": per_layer / t_iso.us, "timer": t_step.method, **report,
              "xla_flags": os.environ.get("XLA_FLAGS", "")}
    C.write_json(os.path.join(outdir, "model_step.json"), result)
    with open(os.path.join(outdir, "model_step.hlo.txt"), "w") as f:
        f.write(hlo)
    C.log(f"step of {args.layers} layers, B={args.batch} L={args.len}: {t_step.us:.1f} us "
          f"({per_layer:.1f} us/layer); isolated kernel {t_iso.us:.1f} us; per-layer / "
          f"isolated = {per_layer / t_iso.us:.3f}")
    C.log(f"custom call in a command buffer (CUDA graph): "
          f"{report['custom_call_in_command_buffer']}; command buffers "
          f"{report['command_buffers']}, copies {report['copies']}, dynamic-slices "
          f"{report['dynamic_slices']} in the optimized HLO")
    return 0


if __name__ == "__main__":
    sys.exit(main())
