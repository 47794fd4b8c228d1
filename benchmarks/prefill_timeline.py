"""Where an sm90 prefill CTA's time goes, from the phase stamps its CTAs print in a diagnostic
build (CMake -DJPA_SM90_TIMELINE=ON; ffi_src/cuda/sm90/timeline.cuh). `scripts/gpu_check.sh
timeline` makes that build, runs this, and builds the normal extension again.

    python3 benchmarks/prefill_timeline.py [--only =4x2048,=1x8192] [--out DIR]

For each bench_prefill point chosen (--only as there), one call of ours runs in a child
process (device printf reaches its stdout when the context is synchronized); each CTA with
rows prints its SM, block index, key tiles, global-timer start / end and five clock64 stamps:
entry, Q staged, tile 0 landed, the tile loop done, the epilogue done. Reported per point: the
median and 90th percentile of each phase in us (clock64 cycles over the clock rate the global
timer gives), each phase's share of the SMs' time between the first start and the last end,
the idle gap between one CTA's end and the next CTA's start on the same SM, and the tile loop
fitted as a + b * tiles. Writes timeline.md and the raw lines (timeline_<point>.txt) under
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
    span_us = (ns1.max() - ns0.min()) / 1e3
    sms = np.unique(smid)
    gaps = []
    for s in sms:
        order = np.argsort(ns0[smid == s])
        starts, ends = ns0[smid == s][order], ns1[smid == s][order]
        gaps.extend(((starts[1:] - ends[:-1]) / 1e3).tolist())
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
    lines.append(f"| gap to the SM's next CTA | {g['median']:.2f} | {g['p90']:.2f} | "
                 f"{100 * g['share']:.1f}% |")
    f = a["loop_fit"]
    lines += ["", f"Tile loop fit: {f['fixed_us']:.2f} us + {f['per_tile_us']:.3f} us per key "
              "tile.", ""]
    return "\n".join(lines)


def _sync_context() -> None:
    """Synchronizes the device's primary context (driver API): device printf output is
    flushed to stdout at a context synchronization, which JAX's waits need not be."""
    cuda = ctypes.CDLL("libcuda.so.1")
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    for call in (lambda: cuda.cuInit(0), lambda: cuda.cuDeviceGet(ctypes.byref(dev), 0),
                 lambda: cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev),
                 lambda: cuda.cuCtxPushCurrent(ctx), lambda: cuda.cuCtxSynchronize()):
        rc = call()
        if rc != 0:
            raise RuntimeError(f"CUDA driver call failed with {rc}")


def child(name: str) -> None:
    """One call of ours at the point `name` (then a context synchronization)."""
    import jax

    import bench_prefill as BP
    (pt,) = BP.select(BP.points(False, False), "=" + name)
    x = BP.build_inputs(pt, seed=0)
    (built,) = BP.build_ours(pt, x)
    jax.block_until_ready(jax.jit(built.fn)(*built.args))
    _sync_context()
    print("jpa-tl-done", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="=4x2048,=1x8192",
                   help="bench_prefill points, as its --only (default: =4x2048,=1x8192)")
    p.add_argument("--out", default="out/timeline")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    import bench_prefill as BP
    os.makedirs(args.out, exist_ok=True)
    parts, failed = ["# sm90 prefill CTA phases (diagnostic build)", ""], 0
    for pt in BP.select(BP.points(False, False), args.only):
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", pt.name],
                           capture_output=True, text=True, timeout=300)
        safe = "".join(c if c.isalnum() else "_" for c in pt.name)
        with open(os.path.join(args.out, f"timeline_{safe}.txt"), "w") as f:
            f.write(r.stdout)
        rows = parse(r.stdout)
        if r.returncode != 0 or rows.shape[0] == 0:
            failed += 1
            parts.append(f"### {pt.name}\n\nno stamps (rc {r.returncode}; is the build a "
                         f"JPA_SM90_TIMELINE one?): {r.stderr.strip()[-400:]}\n")
            continue
        parts.append(markdown(f"{pt.name} ({pt.config})", analyse(rows)))
        print(parts[-1], flush=True)
    with open(os.path.join(args.out, "timeline.md"), "w") as f:
        f.write("\n".join(parts) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
