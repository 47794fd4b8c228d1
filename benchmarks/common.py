"""Shared helpers for the benchmarks: device facts, timing, checks, output. Their inputs come
from tests/device_inputs.py (values on the device, metadata from tests/cases.py): each
benchmark puts tests/ on sys.path (``add_tests_to_path``) and imports it.

Timing (DESIGN.md §5, device METHOD.md):
  * Primary: CUPTI kernel times through `jax.experimental.mosaic.gpu.profiler.measure`
    (sum of the kernel durations of one call, in ms, one sample per iteration).
  * Fallback: wall clock around `jax.block_until_ready`, several calls per sample.
  * Every reported time is the median of >= 20 samples (fewer only in --cpu-smoke).
  * Inputs are fresh random data (never zeros). When one input set would fit in L2, the
    benchmark builds several independent sets and one timed call runs the op once on each
    (one jitted executable, R launches); the time per op is the total divided by R.

Nothing here imports jax_paged_attn: the benchmarks do, so a broken build shows up as a
failing `ours` row rather than a crash.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings

import jax
import jax.numpy as jnp
import numpy as np

GiB = 1 << 30
MiB = 1 << 20


# ------------------------------------------------------------------------------ environment


TESTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")


def add_tests_to_path() -> None:
    """Makes tests/cases.py and tests/device_inputs.py (the input builders) importable."""
    if TESTS_DIR not in sys.path:
        sys.path.insert(0, TESTS_DIR)


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def guess_l2_bytes(device_kind: str) -> int:
    """L2 size by device name (jax does not expose it). JPA_BENCH_L2_BYTES overrides."""
    env = os.environ.get("JPA_BENCH_L2_BYTES")
    if env:
        return int(env)
    kind = device_kind.upper()
    for name, size in (("H200", 60_000_000), ("H100", 50_000_000), ("H800", 50_000_000),
                       ("A100", 40_000_000), ("L40", 96_000_000), ("B200", 126_000_000)):
        if name in kind:
            return size
    return 50_000_000


def device_info() -> dict:
    dev = jax.devices()[0]
    info = {
        "backend": jax.default_backend(),
        "device_kind": getattr(dev, "device_kind", "?"),
        "num_devices": jax.device_count(),
        "jax": jax.__version__,
        "python": sys.version.split()[0],
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import jaxlib
        info["jaxlib"] = jaxlib.__version__
    except Exception:  # pragma: no cover
        pass
    try:
        info["platform_version"] = dev.client.platform_version
    except Exception:
        pass
    if on_gpu():
        try:
            from jax._src.lib import cuda_versions
            info["cudnn"] = cuda_versions.cudnn_get_version()
        except Exception as e:
            info["cudnn"] = f"unknown ({type(e).__name__})"
        try:
            stats = dev.memory_stats() or {}
            info["memory_limit_bytes"] = int(stats.get("bytes_limit", 0))
        except Exception:
            pass
        try:
            info["compute_capability"] = dev.compute_capability
        except Exception:
            pass
    info["l2_bytes_assumed"] = guess_l2_bytes(info["device_kind"])
    return info


def device_memory_limit() -> int:
    """Bytes XLA may allocate on device 0 (0 when unknown)."""
    try:
        return int((jax.devices()[0].memory_stats() or {}).get("bytes_limit", 0))
    except Exception:
        return 0


def free(*trees) -> None:
    """Deletes the device buffers of every jax.Array leaf, then collects garbage."""
    for tree in trees:
        for leaf in jax.tree_util.tree_leaves(tree):
            if isinstance(leaf, jax.Array):
                try:
                    leaf.delete()
                except Exception:
                    pass
    gc.collect()


def short_error(e: BaseException, limit: int = 300) -> str:
    """One line naming the exception: what a table cell or a log line can carry."""
    msg = str(e).strip().splitlines()
    first = msg[0] if msg else ""
    # XLA errors put the useful part after the status prefix; keep one line of it.
    text = f"{type(e).__name__}: {first}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def log(*parts) -> None:
    print(*parts, flush=True)


# ------------------------------------------------------------------------------ CLI


def base_parser(description: str, impls: tuple[str, ...]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=None,
                   help="directory for JSON / Markdown / PNG (default: $OUT, else ./out)")
    p.add_argument("--quick", action="store_true", help="fewer points and repetitions")
    p.add_argument("--impls", default=",".join(impls),
                   help=f"comma list out of {','.join(impls)} (default: all)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed samples per measurement (default 30, --quick 20; min 20 on GPU)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny shapes and few repetitions: checks the code path on any backend")
    p.add_argument("--no-cupti", action="store_true", help="time with the wall clock only")
    p.add_argument("--full-on-cpu", action="store_true",
                   help="run the real sizes even without a GPU (default: switch to "
                        "--cpu-smoke there)")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="stop starting new points after this many seconds (outputs are "
                        "written after every point)")
    return p


def parse_impls(text: str, allowed: tuple[str, ...]) -> list[str]:
    names = [s.strip().lower() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in allowed]
    if bad:
        raise SystemExit(f"--impls: unknown {bad}; choose from {list(allowed)}")
    return names


def out_dir(arg: str | None) -> str:
    path = arg or os.environ.get("OUT") or os.path.join(os.getcwd(), "out")
    os.makedirs(path, exist_ok=True)
    return path


def check_backend(args) -> None:
    """Without a GPU the real sizes take hours and mean nothing: fall back to --cpu-smoke."""
    if on_gpu() or args.cpu_smoke:
        return
    if args.full_on_cpu:
        log(f"WARNING: backend is {jax.default_backend()}, not gpu: numbers are not "
            "meaningful")
        return
    log(f"NOTE: backend is {jax.default_backend()}, not gpu: running --cpu-smoke sizes "
        "(pass --full-on-cpu to override)")
    args.cpu_smoke = True


def resolve_reps(args) -> int:
    if args.reps is not None:
        reps = args.reps
    elif args.cpu_smoke:
        reps = 5
    else:
        reps = 20 if args.quick else 30
    if not args.cpu_smoke:
        reps = max(reps, 20)
    return reps


# ------------------------------------------------------------------------------ timing


@dataclasses.dataclass
class TimeResult:
    us: float                 # median time of ONE op (total per call / ops_per_call)
    p10_us: float
    p90_us: float
    samples: int
    method: str               # "cupti" or "wall"
    ops_per_call: int = 1
    wall_us: float | None = None   # wall-clock median per op, for cross-checking CUPTI
    note: str = ""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _percentile(xs, q):
    return float(np.percentile(np.asarray(xs, np.float64), q))


class Timer:
    """Times a jitted function over fixed arguments.

    `time(jfn, args, ops_per_call=R)` returns the per-op median; `jfn(*args)` must already
    have been called once (compiled) by the caller, which also keeps its output for checks.
    """

    def __init__(self, reps: int = 30, use_cupti: bool = True, wall_reps: int = 10,
                 max_inflight_bytes: int = 2 * GiB):
        self.reps = max(1, int(reps))
        self.wall_reps = max(3, int(wall_reps))
        self.max_inflight_bytes = max_inflight_bytes
        self.profiler = None
        self.cupti_status = "disabled (--no-cupti)" if not use_cupti else "not tried"
        if use_cupti:
            self._init_cupti()

    # -- CUPTI ---------------------------------------------------------------------------

    def _init_cupti(self) -> None:
        if not on_gpu():
            self.cupti_status = f"unavailable: backend is {jax.default_backend()}"
            return
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from jax.experimental.mosaic.gpu import profiler
        except Exception as e:
            self.cupti_status = f"unavailable: import failed ({short_error(e)})"
            return
        if getattr(profiler, "mosaic_gpu_lib", "absent") is None:
            self.cupti_status = "unavailable: Mosaic GPU bindings not importable"
            return
        if not hasattr(profiler, "measure"):
            self.cupti_status = "unavailable: profiler.measure missing"
            return
        # Self-test on a small op: the API returns (outputs, ms) or (outputs, [ms, ...]).
        try:
            x = jax.random.normal(jax.random.key(0), (1 << 20,), jnp.float32)
            f = jax.jit(lambda a: a * 2.0 + 1.0)
            jax.block_until_ready(f(x))
            _, t = profiler.measure(f, iterations=2)(x)
            if t is None:
                raise RuntimeError("CUPTI recorded no kernels")
            ts = list(t) if isinstance(t, (list, tuple)) else [t]
            if not ts or not all(isinstance(v, (int, float)) and v > 0 for v in ts):
                raise RuntimeError(f"unexpected timings {t!r}")
            free(x)
        except Exception as e:
            self.cupti_status = f"unavailable: self-test failed ({short_error(e)})"
            return
        self.profiler = profiler
        self.cupti_status = "ok"

    def _cupti_samples(self, jfn, args, n, out_bytes):
        # measure() keeps every iteration's outputs alive until it returns: cap the chunk.
        per_chunk = int(max(2, min(n, self.max_inflight_bytes // max(out_bytes, 1))))
        samples = []
        while len(samples) < n:
            k = max(2, min(per_chunk, n - len(samples)))
            _, t = self.profiler.measure(jfn, iterations=k)(*args)
            if t is None:
                raise RuntimeError("CUPTI recorded no kernels for this function")
            ts = list(t) if isinstance(t, (list, tuple)) else [t]
            for v in ts:
                if isinstance(v, (list, tuple)):      # aggregate=False shape: [(name, ms)]
                    v = sum(item[1] for item in v)
                samples.append(float(v))
        return samples                                 # ms per call

    # -- wall clock -----------------------------------------------------------------------

    @staticmethod
    def _wall_samples(jfn, args, n, target_s=2e-3, max_inner=64):
        jax.block_until_ready(jfn(*args))
        t0 = time.perf_counter()
        jax.block_until_ready(jfn(*args))
        probe = time.perf_counter() - t0
        inner = int(min(max_inner, max(1, math.ceil(target_s / max(probe, 1e-7)))))
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            out = None
            for _ in range(inner):
                out = jfn(*args)
            jax.block_until_ready(out)
            samples.append((time.perf_counter() - t0) / inner * 1e3)
            del out
        return samples                                 # ms per call

    def kernels(self, jfn, args, limit: int | None = 12) -> list | None:
        """[(kernel name, us)] of one call, by CUPTI (None without CUPTI): shows which
        kernels a call launches and that CUPTI sees them."""
        if self.profiler is None:
            return None
        try:
            _, t = self.profiler.measure(jfn, aggregate=False)(*args)
        except Exception:
            return None
        if not t:
            return []
        if t and isinstance(t[0], list):          # several iterations: keep the first
            t = t[0]
        return [(str(name)[:100], float(ms) * 1e3) for name, ms in list(t)[:limit]]

    # -- public ---------------------------------------------------------------------------

    def time(self, jfn, args, *, ops_per_call: int = 1, out_bytes: int = 0,
             wall_check: bool = True) -> TimeResult:
        note = ""
        method = "wall"
        samples = None
        if self.profiler is not None:
            try:
                samples = self._cupti_samples(jfn, args, self.reps, out_bytes)
                method = "cupti"
            except Exception as e:
                note = f"CUPTI failed, wall clock used: {short_error(e, 160)}"
                samples = None
        wall = None
        if samples is None:
            samples = self._wall_samples(jfn, args, self.reps)
            wall = samples
        elif wall_check:
            try:
                wall = self._wall_samples(jfn, args, self.wall_reps)
            except Exception:
                wall = None
        r = max(1, ops_per_call)
        to_us = 1e3 / r
        return TimeResult(
            us=statistics.median(samples) * to_us,
            p10_us=_percentile(samples, 10) * to_us,
            p90_us=_percentile(samples, 90) * to_us,
            samples=len(samples), method=method, ops_per_call=r,
            wall_us=(statistics.median(wall) * to_us) if wall else None, note=note)


def time_carried(fn, state, rest, *, reps: int, ops_per_call: int = 1,
                 target_s: float = 2e-3, max_inner: int = 16):
    """Wall-clock time of `state, out = fn(state, *rest)` for a jitted `fn` that donates its
    `state` (an in-place cache update): every call consumes the previous call's state, so
    no argument is ever passed twice (profiler.measure re-passes its arguments, which
    donation forbids). Returns (TimeResult, the final state)."""
    state, out = fn(state, *rest)
    jax.block_until_ready((state, out))
    t0 = time.perf_counter()
    state, out = fn(state, *rest)
    jax.block_until_ready((state, out))
    probe = time.perf_counter() - t0
    inner = int(min(max_inner, max(1, math.ceil(target_s / max(probe, 1e-7)))))
    samples = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        for _ in range(inner):
            state, out = fn(state, *rest)
        jax.block_until_ready((state, out))
        samples.append((time.perf_counter() - t0) / inner * 1e3)
    del out
    to_us = 1e3 / max(1, ops_per_call)
    med = statistics.median(samples) * to_us
    return TimeResult(us=med, p10_us=_percentile(samples, 10) * to_us,
                      p90_us=_percentile(samples, 90) * to_us, samples=len(samples),
                      method="wall", ops_per_call=max(1, ops_per_call), wall_us=med,
                      note="state carried (donated)"), state


def multi_call(fn):
    """jit(lambda *sets: tuple(fn(*s) for s in sets)): one executable running the op once per
    input set, so a timed call walks several working sets (L2 rotation)."""
    return jax.jit(lambda *sets: tuple(fn(*s) for s in sets))


def rotation_count(bytes_per_set: int, l2_bytes: int, max_sets: int = 16,
                   factor: float = 4.0) -> int:
    """How many independent input sets make the timed working set >= factor x L2."""
    if bytes_per_set <= 0:
        return 1
    return int(min(max_sets, max(1, math.ceil(factor * l2_bytes / bytes_per_set))))


def tree_nbytes(tree) -> int:
    return int(sum(getattr(x, "nbytes", 0) for x in jax.tree_util.tree_leaves(tree)))


# ------------------------------------------------------------------------------ ceilings


def measure_bandwidth_ceiling(timer: Timer, nbytes: int = 2 * GiB, copy: bool = True) -> dict:
    """Read ceiling: jnp.sum over a random bf16 array of `nbytes` (bytes / time). Also a
    copy-like pass (y = -x: bytes read + written) for reference."""
    n = nbytes // 2
    res = {"bytes": int(n * 2)}
    x = jax.random.normal(jax.random.key(1234), (n,), jnp.bfloat16)
    jax.block_until_ready(x)
    try:
        f = jax.jit(lambda a: jnp.sum(a))
        jax.block_until_ready(f(x))
        t = timer.time(f, (x,), out_bytes=4)
        res["read_us"] = t.us
        res["read_gbps"] = n * 2 / (t.us * 1e-6) / 1e9
        res["read_method"] = t.method
        res["read_wall_us"] = t.wall_us
        if copy:
            g = jax.jit(lambda a: -a)
            jax.block_until_ready(g(x))
            t = timer.time(g, (x,), out_bytes=n * 2)
            res["copy_us"] = t.us
            res["copy_gbps"] = 2 * n * 2 / (t.us * 1e-6) / 1e9
    except Exception as e:
        res["error"] = short_error(e)
    finally:
        free(x)
    return res


def measure_matmul_ceiling(timer: Timer, n: int = 8192) -> dict:
    """bf16 matmul rate on random data (2 n^3 FLOPs per product)."""
    res = {"n": n}
    k1, k2 = jax.random.split(jax.random.key(4321))
    a = jax.random.normal(k1, (n, n), jnp.bfloat16)
    b = jax.random.normal(k2, (n, n), jnp.bfloat16)
    try:
        f = jax.jit(lambda a, b: a @ b)
        jax.block_until_ready(f(a, b))
        t = timer.time(f, (a, b), out_bytes=n * n * 2)
        res["us"] = t.us
        res["tflops"] = 2 * n ** 3 / (t.us * 1e-6) / 1e12
        res["method"] = t.method
    except Exception as e:
        res["error"] = short_error(e)
    finally:
        free(a, b)
    return res


# ------------------------------------------------------------------------------ checks


@jax.jit
def _rel_l2(a, b):
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(jnp.square(a - b))) / jnp.sqrt(jnp.sum(jnp.square(b)))


def rel_l2(x, ref) -> float:
    """||x - ref|| / ||ref|| in float32 (NaN if either holds NaN or sizes differ)."""
    x = jnp.asarray(x)
    ref = jnp.asarray(ref)
    if x.shape != ref.shape:
        if x.size != ref.size:
            return float("nan")
        x = x.reshape(ref.shape)
    return float(_rel_l2(x, ref))


# ------------------------------------------------------------------------------ output


def write_json(path: str, obj) -> None:
    def default(o):
        if isinstance(o, (np.integer,)):
            return int(o)
        if isinstance(o, (np.floating,)):
            return float(o)
        if dataclasses.is_dataclass(o):
            return dataclasses.asdict(o)
        return str(o)

    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=default)
    os.replace(tmp, path)


def fmt_num(v, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


# Column groups every benchmark table shares: (header, row key, format).
HEAD_COLUMNS = [("point", "point", ""), ("config", "config", ""), ("impl", "impl", ""),
                ("B", "B", "d"), ("L", "L", "d"), ("time us", "us", ".1f")]
CHECK_COLUMNS = [("rel L2", "rel_l2", ".1e"), ("vs", "rel_vs", ""), ("check", "check", ""),
                 ("wall us", "wall_us", ".1f"), ("timer", "method", ""),
                 ("status", "status", "")]
SHORT_HEAD = [("point", "point", ""), ("impl", "impl", ""), ("us", "us", ".1f")]
SHORT_CHECK = [("relL2", "rel_l2", ".1e"), ("vs", "rel_vs", ""), ("check", "check", ""),
               ("status", "status", "")]


def log_row(row: dict, rate: str, width: int = 11) -> None:
    """One implementation's result while a benchmark runs; `rate` is its formatted
    throughput (GB/s, TFLOP/s)."""
    if row.get("status") != "ok":
        log(f"    {row['impl']:<{width}} {row.get('status')}")
        return
    sets = f", {row['sets']} set(s)" if "sets" in row else ""
    log(f"    {row['impl']:<{width}} {row['us']:10.1f} us  {rate}  "
        f"[{row['method']}, wall {fmt_num(row.get('wall_us'), '.1f')} us{sets}] "
        f"{row.get('note', '')}")


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (header, key, format spec; "" for str())."""
    head = "| " + " | ".join(c[0] for c in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for _, key, spec in columns:
            v = r.get(key)
            cells.append(fmt_num(v, spec) if spec else ("-" if v is None else str(v)))
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def try_plot_bars(path: str, rows: list[dict], metric: str, *, ylabel: str, title: str,
                  hline: float | None = None, hline_label: str = "") -> str:
    """Grouped bar chart of `metric`, one group per point and one bar per implementation;
    returns "" on success or why it was skipped. Rows that failed the correctness check
    are left out: their speed is not comparable."""
    rows = [r for r in rows if r.get("check") != "MISMATCH"]
    groups = list(dict.fromkeys(r["point"] for r in rows if r.get(metric)))
    impls = list(dict.fromkeys(r["impl"] for r in rows if r.get(metric)))
    series = {i: [next((r[metric] for r in rows
                        if r["point"] == g and r["impl"] == i and r.get(metric)), None)
                  for g in groups] for i in impls}
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return f"matplotlib unavailable ({type(e).__name__})"
    try:
        names = list(series)
        width = 0.8 / max(1, len(names))
        fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(groups) + 2), 4.5))
        xs = np.arange(len(groups))
        for i, name in enumerate(names):
            vals = [np.nan if v is None else v for v in series[name]]
            ax.bar(xs + (i - (len(names) - 1) / 2) * width, vals, width, label=name)
        if hline:
            ax.axhline(hline, color="k", linestyle="--", linewidth=1, label=hline_label)
        ax.set_xticks(xs)
        ax.set_xticklabels(groups, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return ""
    except Exception as e:
        return f"plot failed ({short_error(e)})"


def run_impl(row: dict, build, timer: "Timer", *, compile_fn, first_output, time_kwargs,
             metrics):
    """Builds one implementation (its first variant that compiles and runs wins), times it,
    and keeps its first output (as tokens) for the correctness check: returns (row, tokens).

    build() -> variants with .label .fn .args .to_tokens .owned .note; compile_fn(fn) -> a
    callable run as compile_fn(fn)(*variant.args); time_kwargs(variant) -> extra arguments
    of timer.time; metrics(variant, TimeResult) -> fields for the row."""
    try:
        variants = build()
    except Unsupported as e:
        row["status"] = f"skipped: {e}"
        return row, None
    except Exception as e:
        row["status"] = f"error (setup): {short_error(e)}"
        return row, None
    built, outs, jfn, errors = None, None, None, []
    for cand in variants:
        try:
            jfn = compile_fn(cand.fn)
            outs = jax.block_until_ready(jfn(*cand.args))
            built = cand
            break
        except Exception as e:
            errors.append(short_error(e))
    if built is None:
        row["impl"] = variants[0].label if variants else row["impl"]
        row["status"] = "error: " + " | ".join(errors)
        free([o for v in variants for o in v.owned])
        return row, None
    row["impl"] = built.label
    if built.note:
        row["note"] = built.note
    tokens = None
    try:
        # A copy: the outputs are deleted below, and a reshape might share their buffer.
        tokens = jnp.array(built.to_tokens(first_output(outs)), copy=True)
        t = timer.time(jfn, built.args, out_bytes=tree_nbytes(outs), **time_kwargs(built))
        row.update(status="ok", us=t.us, p10_us=t.p10_us, p90_us=t.p90_us,
                   wall_us=t.wall_us, samples=t.samples, method=t.method,
                   **metrics(built, t))
        if t.note:
            row["note"] = (row.get("note", "") + "; " + t.note).strip("; ")
        ks = timer.kernels(jfn, built.args)
        if ks is not None:
            row["kernels"] = ks           # one call's kernels (all input sets), CUPTI
    except Exception as e:
        row["status"] = f"error (timing): {short_error(e)}"
    finally:
        free([o for o in jax.tree_util.tree_leaves(outs) if o is not tokens])
        free(built.owned)
    return row, tokens


def check_rows(rows: list[dict], outs: dict, ref, rel_tol: float, key_of=lambda name: name):
    """Fills rel_l2 / rel_vs / check of each row: ours against the float32 reference, every
    peer against ours (or the reference when ours did not run); logs a one-line summary."""
    for row in rows:
        key = key_of(row["impl"])
        if key not in outs:
            continue
        if key == "ours" or "ours" not in outs:
            base, base_name = ref, "ref-f32"
        else:
            base, base_name = outs["ours"], "ours"
        if base is None:
            continue
        try:
            row["rel_l2"] = rel_l2(outs[key], base)
            row["rel_vs"] = base_name
            if not (row["rel_l2"] <= rel_tol):
                row["check"] = "MISMATCH"
        except Exception as e:
            row["rel_l2_error"] = short_error(e)
    checks = [f"{r['impl']} vs {r['rel_vs']} {r['rel_l2']:.1e}"
              + (" MISMATCH" if r.get("check") else "") for r in rows if "rel_l2" in r]
    if checks:
        log("    rel L2: " + "; ".join(checks))


def run_points(points, *, t_start: float, budget_s: float, run_one, base_row, after_point,
               skip_reason=lambda pt: None) -> list[dict]:
    """Runs each benchmark point in turn, isolating failures: a point that raises, or that
    the time budget or `skip_reason` rules out, becomes one status row and the run goes on.
    `after_point(rows)` runs after every point so a later timeout still leaves results."""
    rows: list[dict] = []
    for i, pt in enumerate(points):
        elapsed = time.time() - t_start
        skip = (f"skipped: time budget ({budget_s:.0f}s) spent" if elapsed > budget_s
                else skip_reason(pt))
        if skip:
            log(f"[{i + 1}/{len(points)}] {pt.name}: {skip}")
            rows.append({**base_row(pt), "impl": "-", "status": skip})
            continue
        log(f"[{i + 1}/{len(points)}] {pt.name} ({pt.config}) t={elapsed:.0f}s")
        try:
            rows += run_one(i, pt)
        except Exception as e:
            log(f"    point failed: {short_error(e)}")
            print_traceback_tail(e)
            rows.append({**base_row(pt), "impl": "-",
                         "status": f"error (point): {short_error(e)}"})
            free()
        after_point(rows)
    return rows


def print_traceback_tail(e: BaseException, lines: int = 6) -> None:
    tb = traceback.format_exception(type(e), e, e.__traceback__)
    text = "".join(tb).rstrip().splitlines()
    for line in text[-lines:]:
        print("      " + line, flush=True)


class Unsupported(Exception):
    """A peer that cannot run this configuration by design (reported as skipped)."""
