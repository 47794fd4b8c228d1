"""Where an attention CTA's time goes, from the phase stamps the tile CTAs print in a
diagnostic build (CMake -DJPA_TIMELINE=ON; ffi_src/cuda/timeline.cuh). `scripts/gpu_check.sh
timeline` makes that build, runs this, and builds the normal extension again.

    python3 benchmarks/kernel_timeline.py [--prefill =4x2048,=1x8192]
                                          [--decode "grid 1x32768,grid 8x8192"] [--out DIR]

For each bench_prefill point (--prefill, as its --only) and bench_decode point (--decode,
exact names; "" runs none), one call of ours runs in a child process (device printf reaches
its stdout when the context is synchronized); each tile CTA with rows (each item of an sm90
CTA that takes several) prints its SM, block index, key tiles, global-timer start / end and
five clock64 stamps: entry, Q staged, tile 0 landed, the tile loop done, the epilogue done.
Reported per point: the median and 90th percentile of each phase in us (clock64 cycles over
the clock rate the global timer gives), each phase's share of the SMs' time between the first
start and the last end, the SMs' idle time (between CTAs, and before their first / after their
last CTA: a launch's tail), and the tile loop fitted as a + b * tiles. A split decode's merge
launch prints nothing. Writes timeline.md and the raw lines (timeline_<point>.txt) under
--out. Timing is not the benchmark's: printf and the stamps add a little to each CTA.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The stamps' order in a line (TimelineMark in timeline.cuh) and the phases between them.
kStart, kQ, kTile0, kLoop, kEnd = range(5)
PHASES = (("start -> Q staged", kStart, kQ), ("Q staged -> tile 0 landed", kQ, kTile0),
          ("tile loop", kTile0, kLoop), ("epilogue", kLoop, kEnd), ("whole CTA", kStart, kEnd))


def parse(text: str) -> np.ndarray:
    """The `jpa-tl` lines of a child's output as int64 rows: smid, x, y, z, ntiles,
    ns_start, ns_end, clk0 .. clk4."""
    rows = [[int(v) for v in line.split()[1:]] for line in text.splitlines()
            if line.startswith("jpa-tl ") and len(line.split()) == 13]
    return np.asarray(rows, np.int64).reshape(-1, 12)


def analyse(rows: np.ndarray) -> dict:
    """Phase statistics of one call's CTAs (rows as parse gives them)."""
    smid, ntiles = rows[:, 0], rows[:, 4]
    ns0, ns1, clk = rows[:, 5], rows[:, 6], rows[:, 7:12]
    # cycles per ns from each CTA's own span (clock64 runs at the SM clock)
    per_ns = np.median((clk[:, kEnd] - clk[:, kStart]) / np.maximum(ns1 - ns0, 1))
    has_tiles = ntiles > 0
    phases = {}
    for name, a, b in PHASES:
        # the tile 0 stamp exists only in CTAs with key tiles
        keep = has_tiles if kTile0 in (a, b) else np.ones_like(has_tiles)
        us = (clk[keep, b] - clk[keep, a]) / per_ns / 1e3
        phases[name] = {"median": float(np.median(us)) if us.size else float("nan"),
                        "p90": float(np.percentile(us, 90)) if us.size else float("nan"),
                        "sum": float(us.sum())}
    t0, t1 = ns0.min(), ns1.max()
    span_us = (t1 - t0) / 1e3
    sms = np.unique(smid)
    # Per SM, the union of its CTAs' intervals (CTAs of one SM may overlap): the idle gaps
    # between its busy runs, and the idle time before its first and after its last CTA.
    gaps, edge_us = [], 0.0
    for s in sms:
        order = np.argsort(ns0[smid == s])
        starts, ends = ns0[smid == s][order], ns1[smid == s][order]
        run_end = ends[0]
        for a, b in zip(starts[1:], ends[1:]):
            if a > run_end:
                gaps.append((a - run_end) / 1e3)
            run_end = max(run_end, b)
        edge_us += ((starts[0] - t0) + (t1 - run_end)) / 1e3
    gaps = np.asarray(gaps, np.float64)
    loop_us = (clk[has_tiles, kLoop] - clk[has_tiles, kTile0]) / per_ns / 1e3
    fit = (np.polyfit(ntiles[has_tiles], loop_us, 1)
           if np.unique(ntiles[has_tiles]).size > 1 else [float("nan"), float("nan")])
    return {
        "ctas": int(rows.shape[0]), "sms": int(sms.size), "span_us": float(span_us),
        "ghz": float(per_ns), "phases": phases,
        "share": {k: v["sum"] / (sms.size * span_us) for k, v in phases.items()},
        "gap": {"median": float(np.median(gaps)) if gaps.size else float("nan"),
                "p90": float(np.percentile(gaps, 90)) if gaps.size else float("nan"),
                "share": float(gaps.sum() / (sms.size * span_us)) if gaps.size else 0.0},
        "edge_share": float(edge_us / (sms.size * span_us)),
        "loop_fit": {"per_tile_us": float(fit[0]), "fixed_us": float(fit[1])},
        "mean_tiles": float(ntiles.mean()),
    }


def markdown(name: str, a: dict) -> str:
    lines = [f"### {name}", "",
             f"{a['ctas']} CTAs on {a['sms']} SMs over {a['span_us']:.1f} us (first start to last "
             f"end; SM clock {a['ghz']:.2f} GHz from the stamps), {a['mean_tiles']:.1f} key "
             "tiles a CTA on average.", "",
             "| phase | median us | p90 us | share of the SMs' time |", "|---|---|---|---|"]
    for k, v in a["phases"].items():
        lines.append(f"| {k} | {v['median']:.2f} | {v['p90']:.2f} | {100 * a['share'][k]:.1f}% |")
    g = a["gap"]
    lines.append(f"| SM idle between its CTAs | {g['median']:.2f} | {g['p90']:.2f} | "
                 f"{100 * g['share']:.1f}% |")
    lines.append(f"| SM idle before its first / after its last CTA | | | "
                 f"{100 * a['edge_share']:.1f}% |")
    f = a["loop_fit"]
    lines += ["", f"Tile loop fit: {f['fixed_us']:.2f} us + {f['per_tile_us']:.3f} us per key "
              "tile.", ""]
    return "\n".join(lines)


def _sync_context() -> None:
    """Synchronizes the device's primary context (driver API): device printf output is
    flushed to stdout at a context synchronization, which JAX's waits need not be. Also
    flushed when the process exits (run 12 saw every stamp arrive with the unversioned
    cuCtxPushCurrent failing with 201), so a failure here is reported, not fatal."""
    cuda = ctypes.CDLL("libcuda.so.1")
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    # the _v2 entry points: the unversioned names are the pre-CUDA 4 ABI
    for name, call in (("cuInit", lambda: cuda.cuInit(0)),
                       ("cuDeviceGet", lambda: cuda.cuDeviceGet(ctypes.byref(dev), 0)),
                       ("cuDevicePrimaryCtxRetain",
                        lambda: cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev)),
                       ("cuCtxPushCurrent_v2", lambda: cuda.cuCtxPushCurrent_v2(ctx)),
                       ("cuCtxSynchronize", lambda: cuda.cuCtxSynchronize())):
        rc = call()
        if rc != 0:
            print(f"kernel_timeline: {name} failed with {rc}; the stamps come at exit",
                  file=sys.stderr, flush=True)
            return


def _points(bench: str, names: str) -> list:
    """The benchmark's points that `names` chooses (prefill: as bench_prefill --only; decode:
    exact names, comma-separated)."""
    if not names:
        return []
    if bench == "prefill":
        import bench_prefill as BP
        return BP.select(BP.points(False, False), names)
    import bench_decode as BD
    return BD.select(BD.grid_points(False) + BD.extra_points(), names)


def child(bench: str, name: str) -> None:
    """One call of ours at the point `name` of `bench` (then a context synchronization)."""
    import jax

    (pt,) = _points(bench, "=" + name if bench == "prefill" else name)
    if bench == "prefill":
        import bench_prefill as BP
        (built,) = BP.build_ours(pt, BP.build_inputs(pt, seed=0))
        args = built.args
    else:
        import bench_decode as BD
        (built,) = BD.build_ours(pt, BD.build_sets(pt, 1, seed=0))
        args = built.args[0]
    jax.block_until_ready(jax.jit(built.fn)(*args))
    _sync_context()
    print("jpa-tl-done", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prefill", default="=4x2048,=1x8192",
                   help="bench_prefill points, as its --only (\"\": none)")
    p.add_argument("--decode", default="grid 1x32768,grid 8x8192",
                   help="bench_decode point names, comma-separated (\"\": none)")
    p.add_argument("--out", default="out/timeline")
    p.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    os.makedirs(args.out, exist_ok=True)
    parts, failed = ["# Attention tile CTA phases (diagnostic build)", ""], 0
    chosen = ([("prefill", pt) for pt in _points("prefill", args.prefill)]
              + [("decode", pt) for pt in _points("decode", args.decode)])
    for bench, pt in chosen:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", bench,
                            pt.name], capture_output=True, text=True, timeout=300)
        safe = bench + "_" + "".join(c if c.isalnum() else "_" for c in pt.name)
        with open(os.path.join(args.out, f"timeline_{safe}.txt"), "w") as f:
            f.write(r.stdout)
        rows = parse(r.stdout)
        if r.returncode != 0 or rows.shape[0] == 0:
            failed += 1
            parts.append(f"### {bench} {pt.name}\n\nno stamps (rc {r.returncode}; is the build "
                         f"a JPA_TIMELINE one?): {r.stderr.strip()[-400:]}\n")
            continue
        parts.append(markdown(f"{bench} {pt.name} ({pt.config})", analyse(rows)))
        print(parts[-1], flush=True)
    with open(os.path.join(args.out, "timeline.md"), "w") as f:
        f.write("\n".join(parts) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
