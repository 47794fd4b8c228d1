"""Decode attention inside a model step: one jitted step scans `--layers` layers over a
stacked KV cache [layers, P, page, Hkv, D]. Two ways to give each layer its cache:

  stacked  the whole stack plus `layer=i` (the scan counter): nothing is copied;
  sliced   the stack as a scan input, i.e. `k_stack[i]` per layer (XLA copies the slice).

Two steps per mode: `decode` (attention only, the cache read) and `decode+append` (as in a
real model: each layer first appends one new token per request into the carried, donated
cache, then attends). Reports the time per layer against the isolated ops at the same shapes
(same run), whether XLA copies or slices the cache, and whether our custom calls run inside
a CUDA graph (command buffer). Writes model_step.json, one optimized-HLO file per step and
the thunk sequences XLA dumps (where command buffers really show in recent XLA).

  python3 benchmarks/bench_model_step.py --out OUT [--layers 32 --batch 32 --len 4096]
      [--mode stacked|sliced|both] [--cuda-graph-flags]
"""

from __future__ import annotations

import os
import sys

# Command buffers for everything, loops and conditionals included, from the first op on.
# Names checked against XLA's DebugOptions (CommandBufferCmdType: FUSION, CUBLAS, CUDNN,
# COLLECTIVES, CONDITIONAL, WHILE, CUSTOM_CALL, CUBLASLT, DYNAMIC_SLICE_FUSION, ...).
CUDA_GRAPH_FLAGS = ("--xla_gpu_graph_min_graph_size=1 "
                    "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,"
                    "WHILE,CONDITIONAL")


def _apply_early_flags(argv):
    """--cuda-graph-flags must reach XLA_FLAGS before jax is imported (XLA parses the
    variable once, when it creates its first backend)."""
    if "--cuda-graph-flags" in argv:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                                   + CUDA_GRAPH_FLAGS).strip()


if __name__ == "__main__":
    _apply_early_flags(sys.argv[1:])

import argparse  # noqa: E402
import glob  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

C.add_tests_to_path()
import device_inputs as DI  # noqa: E402

import jax_paged_attn as jpa  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 16
ISO_SETS = 4  # isolated calls rotate over this many layers' caches (not served from L2)

# ----------------------------------------------------------------------------- reports


_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
          "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
# `%name = dtype[dims]{layout} op(` for the ops that move data (copies, slices, and fusions
# XLA named after a copy or slice it fused in, where "copy(" no longer shows).
_MOVE = re.compile(r"^\s*(?:ROOT )?%?([\w.-]+) = (\w+)\[([\d,]*)\]\S* "
                   r"(copy|copy-start|dynamic-slice|dynamic-update-slice|fusion)\(", re.M)


def _data_movement(hlo: str) -> list[tuple[int, str]]:
    """[(bytes, "op name")] of copies, slices and copy/slice fusions, largest first."""
    moves = []
    for name, dtype, dims, op in _MOVE.findall(hlo):
        if op == "fusion" and not re.search(r"copy|slice", name):
            continue
        n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        moves.append((n * _BYTES.get(dtype, 4), f"{op} {name}"))
    return sorted(moves, reverse=True)


def _hlo_report(hlo: str) -> dict:
    """What the optimized HLO says: copies and slices (of the cache?), and command-buffer
    computations (older XLA outlines them in HLO as computations named command_buffer*;
    recent XLA forms them on thunks only, see _thunk_report)."""
    comps = re.split(r"\n(?=\S.*\{\s*$)", hlo, flags=re.M)  # one chunk per computation
    cb = [c for c in comps if c.split("\n", 1)[0].lstrip("%").startswith("command_buffer")]
    moves = _data_movement(hlo)
    return {
        "hlo_command_buffer_computations": len(cb),
        "custom_call_in_hlo_command_buffer": any("jpa_" in c for c in cb),
        "copies": len(re.findall(r"= \S+ copy(?:-start)?\(", hlo)),
        "dynamic_slices": len(re.findall(r"dynamic-slice\(", hlo)),
        "largest_copy_or_slice_bytes": moves[0][0] if moves else 0,
        "largest_copies_or_slices": [f"{b} B {what}" for b, what in moves[:4]],
    }


_THUNK = re.compile(r"^(\s*)(?:\d+:\s*)?(k[A-Z][A-Za-z0-9]*)\b")


def _thunk_report(text: str | None) -> dict:
    """Where our custom calls sit in XLA's thunk sequence dump (after its thunk passes, the
    command-buffer conversion among them): nested (by indentation) under a kCommandBuffer
    thunk means captured in a CUDA graph. A while loop converted whole (WHILE enabled) shows
    as a kWhile inside a kCommandBuffer."""
    if text is None:
        return {"thunk_dump": False}
    counts = {"command_buffers": 0, "custom_calls_in_command_buffer": 0,
              "custom_calls_outside": 0, "whiles_in_command_buffer": 0, "whiles_outside": 0}
    stack = []  # (indent, kind) of the enclosing thunks
    for line in text.splitlines():
        m = _THUNK.match(line)
        if not m:
            continue
        indent, kind = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        inside = any(k == "kCommandBuffer" for _, k in stack)
        if kind == "kCommandBuffer":
            counts["command_buffers"] += 1
        elif kind == "kCustomCall" and ("jpa_" in line or "jpa_" not in text):
            counts["custom_calls_in_command_buffer" if inside else "custom_calls_outside"] += 1
        elif kind == "kWhile":
            counts["whiles_in_command_buffer" if inside else "whiles_outside"] += 1
        stack.append((indent, kind))
    return {"thunk_dump": True, **counts}


def command_buffer_report(hlo: str, thunk_text: str | None = None) -> dict:
    """Is the custom call inside a command buffer (CUDA graph)? Either view counts."""
    rep = {**_hlo_report(hlo), **_thunk_report(thunk_text)}
    rep["custom_call_in_command_buffer"] = bool(
        rep["custom_call_in_hlo_command_buffer"]
        or rep.get("custom_calls_in_command_buffer", 0) > 0)
    return rep


def compile_and_report(jitted, args, outdir, tag):
    """Compile with XLA's dumps on (for this module only), keep the optimized HLO and the
    thunk sequence in `outdir`, and report. Returns (compiled, report)."""
    lowered = jitted.lower(*args)
    dump = tempfile.mkdtemp(prefix="jpa_dump_")
    try:
        try:
            compiled = lowered.compile(compiler_options={"xla_dump_to": dump})
        except Exception as e:  # an XLA without the option: no thunk view then
            C.log(f"  ({tag}: compiling with xla_dump_to failed: {C.short_error(e)})")
            compiled = lowered.compile()
        thunk_text = None
        files = sorted(glob.glob(os.path.join(dump, "*thunk_sequence_after_thunk_passes*.txt"))
                       or glob.glob(os.path.join(dump, "*thunk_sequence*.txt")))
        for i, path in enumerate(files):
            shutil.copy(path, os.path.join(outdir, f"model_step.{tag}.thunks{i or ''}.txt"))
        if files:
            with open(files[0]) as f:
                thunk_text = f.read()
    finally:
        shutil.rmtree(dump, ignore_errors=True)
    hlo = compiled.as_text()
    with open(os.path.join(outdir, f"model_step.{tag}.hlo.txt"), "w") as f:
        f.write(hlo)
    return compiled, command_buffer_report(hlo, thunk_text)


# ----------------------------------------------------------------------------- steps


def decode_step(mode):
    """(q_stack, k_stack, v_stack, bt, sl) -> outs [layers, B, Hq, D]."""
    def step(q_stack, k_stack, v_stack, bt, sl):
        if mode == "stacked":
            def layer(carry, xs):
                i, q = xs
                # A residual-style dependency, as between the layers of a model.
                out = jpa.paged_decode(q + carry.astype(q.dtype), k_stack, v_stack, bt, sl,
                                       layer=i)
                return out * 0.5, out
            xs = (jnp.arange(q_stack.shape[0], dtype=jnp.int32), q_stack)
        else:
            def layer(carry, xs):
                q, k, v = xs
                out = jpa.paged_decode(q + carry.astype(q.dtype), k, v, bt, sl)
                return out * 0.5, out
            xs = (q_stack, k_stack, v_stack)
        return jax.lax.scan(layer, jnp.zeros_like(q_stack[0]), xs)[1]
    return step


def decode_append_step(mode):
    """((k_stack, v_stack), q_stack, new_k, new_v, bt, sl, slots) -> ((k_stack, v_stack),
    outs): per layer, append each request's new token, then attend. The cache is the
    carried, donated state."""
    def step(cache, q_stack, new_k, new_v, bt, sl, slots):
        k_stack, v_stack = cache
        if mode == "stacked":
            def layer(carry, xs):
                x, ks, vs = carry
                i, q, nk, nv = xs
                ks, vs = jpa.append_kv(ks, vs, nk, nv, slots, layer=i)
                out = jpa.paged_decode(q + x.astype(q.dtype), ks, vs, bt, sl, layer=i)
                return (out * 0.5, ks, vs), out
            init = (jnp.zeros_like(q_stack[0]), k_stack, v_stack)
            xs = (jnp.arange(q_stack.shape[0], dtype=jnp.int32), q_stack, new_k, new_v)
            (_, k_stack, v_stack), outs = jax.lax.scan(layer, init, xs)
        else:
            def layer(x, xs):
                q, k, v, nk, nv = xs
                k, v = jpa.append_kv(k, v, nk, nv, slots)
                out = jpa.paged_decode(q + x.astype(q.dtype), k, v, bt, sl)
                return out * 0.5, (out, k, v)
            xs = (q_stack, k_stack, v_stack, new_k, new_v)
            _, (outs, k_stack, v_stack) = jax.lax.scan(layer, jnp.zeros_like(q_stack[0]), xs)
        return (k_stack, v_stack), outs
    return step


def _iso_decode_append(caches, qs, nks, nvs, bt, sl, slots):
    """The isolated pair, once per layer cache of `caches` (L2 rotation)."""
    new, outs = [], []
    for (k, v), q, nk, nv in zip(caches, qs, nks, nvs):
        k, v = jpa.append_kv(k, v, nk, nv, slots)
        new.append((k, v))
        outs.append(jpa.paged_decode(q, k, v, bt, sl))
    return tuple(new), tuple(outs)


# ----------------------------------------------------------------------------- main


def _inputs(args, key):
    kc, kq, knk, knv = jax.random.split(key, 4)
    # Fresh random pages in every layer, one block table for all of them.
    cache = DI.make_paged_cache(kc, batch=args.batch, max_len=args.len, num_kv_heads=HKV,
                                head_dim=D, page_size=PAGE, layers=args.layers)
    bt, sl = cache.block_tables, cache.seq_lens
    pos = sl - 1  # each request's newest token: the one the step appends
    slots = (jnp.take_along_axis(bt, (pos // PAGE)[:, None], axis=1)[:, 0] * PAGE
             + pos % PAGE).astype(jnp.int32)
    shape = (args.layers, args.batch, HKV, D)
    return dict(
        q=DI.random_normal(kq, (args.layers, args.batch, HQ, D), "bf16"),
        k=cache.k, v=cache.v, bt=bt, sl=sl, slots=slots,
        new_k=DI.random_normal(knk, shape, "bf16"), new_v=DI.random_normal(knv, shape, "bf16"))


def _isolated(x, timer, reps):
    """One decode, and one append+decode, at the step's shapes (per op, same run)."""
    n = min(x["k"].shape[0], ISO_SETS)
    iso = jax.jit(lambda q, k, v, bt, sl: jpa.paged_decode(q, k, v, bt, sl))
    sets = [(x["q"][i], x["k"][i], x["v"][i], x["bt"], x["sl"]) for i in range(n)]
    iso_multi = C.multi_call(iso)
    jax.block_until_ready(iso_multi(*sets))
    t_dec = timer.time(iso_multi, sets, ops_per_call=n)
    pair = jax.jit(_iso_decode_append, donate_argnums=0)
    caches = tuple((x["k"][i] + 0, x["v"][i] + 0) for i in range(n))  # own buffers
    rest = (tuple(x["q"][:n]), tuple(x["new_k"][:n]), tuple(x["new_v"][:n]), x["bt"],
            x["sl"], x["slots"])
    t_pair, caches = C.time_carried(pair, caches, rest, reps=reps, ops_per_call=n)
    C.free(caches)
    return t_dec, t_pair


def _run_step(name, mode, x, timer, reps, outdir):
    """Compile, check and time one (step, mode); returns the result row and the outputs."""
    layers = x["k"].shape[0]
    tag = f"{mode}-{name.replace('+', '_')}"
    if name == "decode":
        jitted = jax.jit(decode_step(mode))
        args = (x["q"], x["k"], x["v"], x["bt"], x["sl"])
        compiled, rep = compile_and_report(jitted, args, outdir, tag)
        outs = jax.block_until_ready(compiled(*args))
        t = timer.time(compiled, args)
    else:
        jitted = jax.jit(decode_append_step(mode), donate_argnums=0)
        rest = (x["q"], x["new_k"], x["new_v"], x["bt"], x["sl"], x["slots"])
        cache = (x["k"] + 0, x["v"] + 0)  # the step consumes (donates) its own copy
        compiled, rep = compile_and_report(jitted, (cache, *rest), outdir, tag)
        cache, outs = compiled(cache, *rest)
        outs = jax.block_until_ready(outs)
        t, cache = C.time_carried(compiled, cache, rest, reps=reps)
        C.free(cache)
    row = {"step": name, "mode": mode, "step_us": t.us, "step_wall_us": t.wall_us,
           "per_layer_us": t.us / layers,
           "per_layer_wall_us": (t.wall_us / layers) if t.wall_us else None,
           "timer": t.method, **rep}
    return row, np.asarray(outs, np.float32)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--len", type=int, default=4096)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--mode", choices=("stacked", "sliced", "both"), default="both")
    p.add_argument("--cuda-graph-flags", action="store_true",
                   help=f"append to XLA_FLAGS before jax starts: {CUDA_GRAPH_FLAGS}")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.cuda_graph_flags and CUDA_GRAPH_FLAGS not in os.environ.get("XLA_FLAGS", ""):
        C.log("WARNING: --cuda-graph-flags only works when this file is the program "
              "(XLA_FLAGS is read before main runs)")
    if not C.on_gpu():
        args.layers, args.batch, args.len, args.reps = 2, 2, 64, 3
    outdir = C.out_dir(args.out)
    timer = C.Timer(reps=args.reps)
    C.log(f"device: {C.device_info()}; timer CUPTI {timer.cupti_status}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")

    x = _inputs(args, jax.random.PRNGKey(0))
    t_dec, t_pair = _isolated(x, timer, args.reps)
    iso = {"decode": t_dec, "decode+append": t_pair}
    modes = ("stacked", "sliced") if args.mode == "both" else (args.mode,)
    rows, outs = [], {}
    for name in ("decode", "decode+append"):
        for mode in modes:
            row, outs[name, mode] = _run_step(name, mode, x, timer, args.reps, outdir)
            t_iso = iso[name]
            row.update(isolated_us=t_iso.us, isolated_wall_us=t_iso.wall_us,
                       isolated_timer=t_iso.method, ratio=row["per_layer_us"] / t_iso.us)
            if row["per_layer_wall_us"] and t_iso.wall_us:
                row["ratio_wall"] = row["per_layer_wall_us"] / t_iso.wall_us
            rows.append(row)
            C.log(f"{name:13s} {mode:7s}: step {row['step_us']:.1f} us = "
                  f"{row['per_layer_us']:.1f} us/layer ({row['timer']}); isolated "
                  f"{t_iso.us:.1f} us ({t_iso.method}); per-layer / isolated = "
                  f"{row['ratio']:.3f}; in a command buffer: "
                  f"{row['custom_call_in_command_buffer']}; copies {row['copies']}, "
                  f"dynamic-slices {row['dynamic_slices']}, largest copy/slice "
                  f"{row['largest_copy_or_slice_bytes']} B")
    # Both ways to reach a layer compute the same thing.
    same = {name: bool(np.array_equal(outs[name, "stacked"], outs[name, "sliced"]))
            for name in ("decode", "decode+append") if len(modes) == 2}
    result = {"layers": args.layers, "batch": args.batch, "len": args.len,
              "hq": HQ, "hkv": HKV, "head_dim": D, "page_size": PAGE,
              "isolated_decode": t_dec, "isolated_decode_append": t_pair, "rows": rows,
              "stacked_equals_sliced": same, "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "cuda_graph_flags": args.cuda_graph_flags, "device": C.device_info()}
    C.write_json(os.path.join(outdir, "model_step.json"), result)
    if same and not all(same.values()):
        C.log(f"ERROR: stacked and sliced outputs differ: {same}")
        return 1
    C.log(f"stacked == sliced outputs: {same or 'not compared (one mode)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
