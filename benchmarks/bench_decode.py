"""Paged decode: jax_paged_attn against cuDNN paged attention, Pallas GPU paged attention and
the XLA reference, side by side in one run, with the read ceiling measured in the same run.

    python benchmarks/bench_decode.py [--quick] [--extra] [--impls ours,cudnn,pallas,xla]
                                      [--out DIR] [--cpu-smoke]

"ours-fused-merge" (not in the default list) is ours with split decode merged by its last
tile CTA per (request, KV head) instead of a merge launch (JPA_CUDA_FUSED_MERGE=1): the A/B
of that experimental path.

Grid (DESIGN.md §5): Hq=32 Hkv=8 D=128 page 16 bf16 at (B, L) = (1, 32k), (8, 8k), (32, 4k),
(128, 2k), (256, 1k), plus B=1 L=4096 (latency). --extra adds D=64/256, page 64, Hq=64,
fp8 pages, ragged lengths and q_len_per_req=4.

Bytes per op = K+V bytes of the attended tokens + q + out. Every peer's output is compared
with ours (rel L2); ours with the reference computed in float32. Writes decode.json,
decode.md and decode.png (when matplotlib is importable) under --out.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common as C  # noqa: E402
from jax_paged_attn import launch_options  # noqa: E402

C.add_tests_to_path()
import cases  # noqa: E402
import device_inputs as DI  # noqa: E402

IMPLS = ("ours", "ours-fused-merge", "cudnn", "pallas", "xla")
DEFAULT_IMPLS = ("ours", "cudnn", "pallas", "xla")
# Rows that differ from ours only by the launcher's switches (set around the row's whole
# build / compile / time by run_impl).
IMPL_ENV = {"ours-fused-merge": {"JPA_CUDA_FUSED_MERGE": "1"}}
# rel L2 above this (bf16 data) is flagged: a bf16 output alone gives ~4e-3.
REL_TOL = 2e-2


# ------------------------------------------------------------------------------ points


@dataclasses.dataclass(frozen=True)
class Point:
    tag: str
    batch: int
    max_len: int
    hq: int = 32
    hkv: int = 8
    d: int = 128
    page: int = 16
    kv: str = "bf16"
    ragged: bool = False
    q_len: int = 1

    @property
    def name(self) -> str:
        return f"{self.tag} {self.batch}x{self.max_len}"

    @property
    def config(self) -> str:
        s = f"Hq{self.hq}/Hkv{self.hkv} D{self.d} p{self.page} {self.kv}"
        if self.ragged:
            s += f" L~U[1,{self.max_len}]"
        if self.q_len != 1:
            s += f" q_len {self.q_len}"
        return s


def grid_points(quick: bool) -> list[Point]:
    full = [(1, 32768), (8, 8192), (32, 4096), (128, 2048), (256, 1024)]
    pick = [(1, 32768), (32, 4096), (256, 1024)] if quick else full
    return [Point("grid", b, l) for b, l in pick] + [Point("latency", 1, 4096)]


def extra_points() -> list[Point]:
    return [
        Point("D64", 32, 4096, d=64),
        Point("D256", 32, 4096, d=256),
        Point("page64", 32, 4096, page=64),
        Point("Hq64", 32, 4096, hq=64),
        Point("fp8", 128, 2048, kv="fp8"),
        Point("ragged", 64, 8192, ragged=True),
        Point("qlen4", 32, 4096, q_len=4),
    ]


def select(points: list[Point], only: str) -> list[Point]:
    """The points --only names (exact names, comma-separated)."""
    keep = {n.strip() for n in only.split(",")}
    return [pt for pt in points if pt.name in keep]


def smoke_points(extra: bool) -> list[Point]:
    small = dict(hq=4, hkv=2, d=64)
    pts = [Point("grid", 2, 256, **small), Point("grid", 1, 512, **small),
           Point("latency", 1, 128, **small)]
    if extra:
        pts += [Point("D32", 2, 256, hq=4, hkv=2, d=32),
                Point("page64", 2, 256, page=64, **small),
                Point("Hq8", 2, 256, hq=8, hkv=2, d=64),
                Point("fp8", 2, 256, kv="fp8", **small),
                Point("ragged", 4, 256, ragged=True, **small),
                Point("qlen4", 2, 256, q_len=4, **small)]
    return pts


# ------------------------------------------------------------------------------ inputs


@dataclasses.dataclass
class InputSet:
    q: jax.Array                  # [B * q_len, Hq, D] bf16
    cache: DI.PagedCache


def seq_lens_for(pt: Point, seed: int) -> np.ndarray:
    if pt.ragged:
        return cases.uniform_seq_lens(seed, pt.batch, 1, pt.max_len)
    # Decode with q_len n: seq_len counts the new tokens; max_len is the KV length.
    return np.full((pt.batch,), pt.max_len, np.int32)


def build_sets(pt: Point, count: int, seed: int) -> list[InputSet]:
    lens = seq_lens_for(pt, seed)          # the same lengths in every set: same bytes per op
    sets = []
    for r in range(count):
        kc, kq = jax.random.split(jax.random.key(seed * 7919 + r))
        cache = DI.make_paged_cache(kc, batch=pt.batch, max_len=pt.max_len,
                                    num_kv_heads=pt.hkv, head_dim=pt.d, page_size=pt.page,
                                    dtype=pt.kv, seq_lens=lens)
        q = DI.random_normal(kq, (pt.batch * pt.q_len, pt.hq, pt.d), "bf16")
        sets.append(InputSet(q, cache))
    return sets


def kv_itemsize(kv: str) -> int:
    return 1 if kv == "fp8" else 2


def op_bytes(pt: Point, lens: np.ndarray, itemsize: int) -> int:
    kv = int(lens.astype(np.int64).sum()) * pt.hkv * pt.d * itemsize * 2
    qo = 2 * pt.batch * pt.q_len * pt.hq * pt.d * 2
    return kv + qo


# ------------------------------------------------------------------------------ impls


@dataclasses.dataclass
class Built:
    label: str
    fn: object                    # fn(*arrays) -> output (any layout)
    args: list                    # one tuple of arrays per input set
    to_tokens: object             # output -> [B * q_len, Hq, D]
    itemsize: int                 # bytes per K/V element this impl reads
    owned: list = dataclasses.field(default_factory=list)  # copies to free afterwards
    note: str = ""


def _build_jpa_style(name: str, decode_fn, pt: Point, sets: list[InputSet]) -> list[Built]:
    """Ours and the XLA reference share the public signature."""
    n, c0 = pt.q_len, sets[0].cache

    def fn(q, k, v, bt, sl):
        return decode_fn(q, k, v, bt, sl, q_len_per_req=n, k_scale=c0.k_scale,
                         v_scale=c0.v_scale)

    args = [(s.q, s.cache.k, s.cache.v, s.cache.block_tables, s.cache.seq_lens) for s in sets]
    return [Built(name, fn, args, lambda o: o, kv_itemsize(pt.kv))]


def build_ours(pt: Point, sets: list[InputSet], name: str = "ours") -> list[Built]:
    import jax_paged_attn as jpa
    return _build_jpa_style(name, jpa.paged_decode, pt, sets)


def build_ours_fused_merge(pt: Point, sets: list[InputSet]) -> list[Built]:
    if jax.devices()[0].platform != "gpu":
        raise C.Unsupported("the merge switch is the CUDA launcher's")
    return build_ours(pt, sets, "ours-fused-merge")


def build_xla(pt: Point, sets: list[InputSet]) -> list[Built]:
    from jax_paged_attn import reference
    return _build_jpa_style("xla", reference.paged_decode, pt, sets)


def build_cudnn(pt: Point, sets: list[InputSet]) -> list[Built]:
    # Private API (jax._src.cudnn.fused_attention_stablehlo.paged_attention):
    #   paged_attention(query, key, value, q_seqlen, kv_seqlen, page_table_k, page_table_v,
    #                   bias=None, mask=None, fp8_params=None, *, scale=1.0,
    #                   mask_type=MaskType.NO_MASK, seed=42, dropout_rate=0.,
    #                   qkv_layout="BTNH", sliding_window_length=None, use_fp8=False,
    #                   return_residual=False)
    # query [B, T, N, H]; key/value pools [num_blocks, block_size, N_kv, H] (= our NHD) with
    # num_blocks == B * blocks_per_batch exactly (checked); page tables [B, 1, blocks, 1]
    # int32; scale multiplies q.k. Paged fp8 is rejected by the API, so fp8 points run
    # cuDNN on the same values dequantized to bf16 (row "cudnn-bf16").
    from jax._src.cudnn import fused_attention_stablehlo as fa
    b, n, hq, d = pt.batch, pt.q_len, pt.hq, pt.d
    scale = 1.0 / math.sqrt(d)
    mask = fa.MaskType.PADDING if n == 1 else fa.MaskType.PADDING_CAUSAL
    fp8 = pt.kv == "fp8"

    def fn(q, k, v, bt, sl, qs):
        pt4 = bt.reshape(b, 1, bt.shape[1], 1)
        out = fa.paged_attention(q.reshape(b, n, hq, d), k, v, qs, sl, pt4, pt4,
                                 scale=scale, mask_type=mask, qkv_layout="BTNH")
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out

    qs = jnp.full((b,), n, jnp.int32)
    args = [(s.q, s.cache.k_deq if fp8 else s.cache.k, s.cache.v_deq if fp8 else s.cache.v,
             s.cache.block_tables, s.cache.seq_lens, qs) for s in sets]
    note = ""
    if n != 1:
        note = "PADDING_CAUSAL mask (cuDNN's diagonal alignment may differ: see rel L2)"
    return [Built("cudnn-bf16" if fp8 else "cudnn", fn, args,
                  lambda o: o.reshape(b * n, hq, d), 2, note=note)]


def _divisors_desc(n: int, options) -> list[int]:
    return [c for c in options if c <= n and n % c == 0]


def build_pallas(pt: Point, sets: list[InputSet]) -> list[Built]:
    # jax.experimental.pallas.ops.gpu.paged_attention.paged_attention (Triton; deprecated in
    # JAX 0.11):
    #   paged_attention(q, k_pages, v_pages, block_tables, lengths, k_scales_pages=None,
    #                   v_scales_pages=None, *, block_h=16, pages_per_compute_block=8,
    #                   k_splits=16, num_warps=8, num_stages=2, ...)
    # q [B, Hq, D]; pages [Hkv, P, page, D] (head-major, so our NHD pool is transposed
    # outside the timed region); block_tables [B, pages]; lengths int32 [B]; optional
    # per-token scales [Hkv, P, page] f32 (fp8 pages are cast to q's dtype in the kernel).
    # No softmax scale argument: q is pre-scaled by 1/sqrt(D) outside the timed region.
    # Needs pages % k_splits == 0 and pages_per_partition % pages_per_compute_block == 0.
    if pt.q_len != 1:
        raise C.Unsupported("Pallas paged_attention is decode-only (one query per request)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from jax.experimental.pallas.ops.gpu import paged_attention as pmod
    npages = sets[0].cache.pages_per_req
    k_splits = _divisors_desc(npages, (16, 8, 4, 2, 1))[0]
    ppp = npages // k_splits
    # Default tile: 8 pages x 16 tokens = 128 keys; keep <= 128 keys per block for larger
    # pages, and fall back to smaller blocks if Triton runs out of shared memory.
    blocks = [c for c in _divisors_desc(ppp, (8, 4, 2, 1)) if c * pt.page <= 128] or [1]
    scale = 1.0 / math.sqrt(pt.d)
    fp8 = pt.kv == "fp8"
    to_hnd = jax.jit(lambda a: jnp.transpose(a, (2, 0, 1, 3)))
    prescale = jax.jit(lambda q: (q.astype(jnp.float32) * scale).astype(q.dtype))
    args, owned = [], []
    for s in sets:
        kh, vh, qsc = to_hnd(s.cache.k), to_hnd(s.cache.v), prescale(s.q)
        extra = ()
        if fp8:
            sc = jnp.full((pt.hkv, s.cache.num_pages, pt.page), s.cache.k_scale, jnp.float32)
            extra = (sc, sc)
        a = (qsc, kh, vh, s.cache.block_tables, s.cache.seq_lens) + extra
        args.append(a)
        owned += [kh, vh, qsc] + list(extra)
    jax.block_until_ready(owned)
    interpret = not C.on_gpu()      # --cpu-smoke: Pallas' interpreter checks the call path
    variants = []
    for c in blocks:
        def fn(q, k, v, bt, sl, *scales, _c=c):
            ksc, vsc = scales if scales else (None, None)
            return pmod.paged_attention(q, k, v, bt, sl, ksc, vsc, block_h=16,
                                        pages_per_compute_block=_c, k_splits=k_splits,
                                        interpret=interpret)
        variants.append(Built("pallas", fn, args, lambda o: o, kv_itemsize(pt.kv),
                              owned=owned,
                              note=f"k_splits={k_splits} pages_per_compute_block={c}"))
    return variants


BUILDERS = {"ours": build_ours, "ours-fused-merge": build_ours_fused_merge,
            "cudnn": build_cudnn, "pallas": build_pallas, "xla": build_xla}


# ------------------------------------------------------------------------------ runner


def reference_f32(pt: Point, s: InputSet):
    from jax_paged_attn import reference
    c = s.cache
    f = jax.jit(lambda q, k, v, bt, sl: reference.paged_decode(
        q, k, v, bt, sl, q_len_per_req=pt.q_len, k_scale=c.k_scale, v_scale=c.v_scale,
        out_dtype=jnp.float32))
    return jax.block_until_ready(f(s.q, c.k, c.v, c.block_tables, c.seq_lens))


def run_impl(name, pt, sets, timer, lens, reps_sets):
    row = {"point": pt.name, "tag": pt.tag, "config": pt.config, "impl": name,
           "B": pt.batch, "L": pt.max_len, "sets": reps_sets}

    def metrics(built, t):
        nbytes = op_bytes(pt, lens, built.itemsize)
        return dict(bytes=nbytes, gbps=nbytes / (t.us * 1e-6) / 1e9)

    # One timed call runs every input set (rotation past the L2); time is per set.
    with launch_options.switched(IMPL_ENV.get(name, {})):
        return C.run_impl(row, lambda: BUILDERS[name](pt, sets), timer,
                          compile_fn=C.multi_call, first_output=lambda outs: outs[0],
                          time_kwargs=lambda built: dict(ops_per_call=len(built.args)),
                          metrics=metrics)


def run_point(pt, impls, timer, l2_bytes, seed, smoke, check_ref):
    lens = seq_lens_for(pt, seed)
    one_set = op_bytes(pt, lens, kv_itemsize(pt.kv))
    r = C.rotation_count(one_set, l2_bytes, max_sets=2 if smoke else 16)
    sets = build_sets(pt, r, seed)
    rows, outs = [], {}
    ref = None
    for name in impls:
        row, tok = run_impl(name, pt, sets, timer, lens, r)
        rows.append(row)
        if tok is not None:
            outs[name] = tok
        _print_row(row)
    # Correctness: ours against the float32 reference; every peer against ours (or against
    # the reference when ours did not run).
    if check_ref:
        try:
            ref = reference_f32(pt, sets[0])
        except Exception as e:
            C.log(f"    reference (f32) failed: {C.short_error(e)}")
    C.check_rows(rows, outs, ref, REL_TOL,
                 key_of=lambda name: "cudnn" if name.startswith("cudnn") else name)
    # A peer whose output disagrees with ours computes something else: no ratio against it.
    cud = next((r_ for r_ in rows if r_["impl"].startswith("cudnn") and "us" in r_
                and r_.get("check") != "MISMATCH"), None)
    for row in rows:
        if cud is not None and "us" in row:
            row["vs_cudnn"] = cud["us"] / row["us"]
    C.free(list(outs.values()), ref, [s.q for s in sets], [s.cache.arrays() for s in sets])
    return rows


def _print_row(row):
    C.log_row(row, f"{row['gbps']:8.1f} GB/s" if row.get("status") == "ok" else "")


COLUMNS = (C.HEAD_COLUMNS + [("GB/s", "gbps", ".0f"), ("% read ceil", "pct_ceiling", ".1f"),
                             ("vs cuDNN (x)", "vs_cudnn", ".2f")] + C.CHECK_COLUMNS)


def finalize(rows, ceiling):
    read = ceiling.get("read_gbps")
    for row in rows:
        if read and row.get("gbps"):
            row["pct_ceiling"] = 100.0 * row["gbps"] / read


def write_outputs(outdir, meta, rows, plot=False):
    C.write_json(os.path.join(outdir, "decode.json"), {"meta": meta, "rows": rows})
    ceil = meta["ceiling"]
    md = [f"# Paged decode ({meta['device'].get('device_kind')}, jax {meta['device']['jax']})",
          "",
          f"Timer: {meta['timer']}; read ceiling {C.fmt_num(ceil.get('read_gbps'), '.0f')} GB/s "
          f"(jnp.sum over {ceil.get('bytes', 0) / C.GiB:.3g} GiB bf16), copy "
          f"{C.fmt_num(ceil.get('copy_gbps'), '.0f')} GB/s. Time = median per op; GB/s = "
          "(K+V of attended tokens + q + out) / time; 'vs cuDNN' = cuDNN time / time.",
          "", C.markdown_table(rows, COLUMNS), ""]
    with open(os.path.join(outdir, "decode.md"), "w") as f:
        f.write("\n".join(md))
    if not plot:
        return ""
    return C.try_plot_bars(os.path.join(outdir, "decode.png"), rows, "gbps",
                           ylabel="GB/s (K+V+q+out bytes / time)",
                           title=f"Paged decode, {meta['device'].get('device_kind')}",
                           hline=meta["ceiling"].get("read_gbps"),
                           hline_label="read ceiling (jnp.sum)")


def main(argv=None):
    p = C.base_parser(__doc__.splitlines()[0], IMPLS)
    p.add_argument("--extra", action="store_true", help="also the extra points")
    p.add_argument("--no-ref-check", action="store_true",
                   help="skip the float32 reference used to check ours")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=None,
                   help="comma list of point names to keep, e.g. 'fp8 128x2048,grid 128x2048'")
    p.set_defaults(impls=",".join(DEFAULT_IMPLS))
    args = p.parse_args(argv)
    impls = C.parse_impls(args.impls, IMPLS)
    outdir = C.out_dir(args.out)
    t_start = time.time()
    info = C.device_info()
    C.log(f"device: {info}")
    C.check_backend(args)
    reps = C.resolve_reps(args)
    timer = C.Timer(reps=reps, use_cupti=not args.no_cupti)
    C.log(f"timer: CUPTI {timer.cupti_status}; {reps} samples per measurement")

    ceil_bytes = (32 * C.MiB) if args.cpu_smoke else 2 * C.GiB
    ceiling = C.measure_bandwidth_ceiling(timer, ceil_bytes)
    C.log(f"read ceiling: {C.fmt_num(ceiling.get('read_gbps'), '.1f')} GB/s, copy "
          f"{C.fmt_num(ceiling.get('copy_gbps'), '.1f')} GB/s {ceiling.get('error', '')}")

    if args.cpu_smoke:
        points = smoke_points(args.extra)
    else:
        points = grid_points(args.quick) + (extra_points() if args.extra else [])
    if args.only:
        points = select(points, args.only)
        if not points:
            raise SystemExit(f"--only: no point named {args.only!r}")
    meta = {"device": info, "timer": f"CUPTI {timer.cupti_status}", "reps": reps,
            "ceiling": ceiling, "impls": impls, "argv": sys.argv[1:],
            "l2_bytes": info["l2_bytes_assumed"]}
    rows = C.run_points(
        points, t_start=t_start, budget_s=args.budget_s,
        run_one=lambda i, pt: run_point(pt, impls, timer, info["l2_bytes_assumed"],
                                        args.seed + i, args.cpu_smoke, not args.no_ref_check),
        base_row=lambda pt: {"point": pt.name, "config": pt.config, "B": pt.batch,
                             "L": pt.max_len},
        after_point=lambda rows: (finalize(rows, ceiling), write_outputs(outdir, meta, rows)))

    # The ceiling again at the end: drift between the two says the card's state moved.
    end = C.measure_bandwidth_ceiling(timer, ceil_bytes, copy=False)
    meta["ceiling_end"] = end
    meta["total_s"] = time.time() - t_start
    finalize(rows, ceiling)
    why = write_outputs(outdir, meta, rows, plot=True)
    C.log("")
    C.log(f"read ceiling {C.fmt_num(ceiling.get('read_gbps'), '.0f')} GB/s at start, "
          f"{C.fmt_num(end.get('read_gbps'), '.0f')} GB/s at end; timer CUPTI "
          f"{timer.cupti_status}; {reps} samples; total {meta['total_s']:.0f}s")
    if why:
        C.log(f"(no PNG: {why})")
    C.log(f"outputs in {outdir}: decode.json, decode.md" + ("" if why else ", decode.png"))
    C.log("")
    short = (C.SHORT_HEAD + [("GB/s", "gbps", ".0f"), ("%ceil", "pct_ceiling", ".1f"),
                             ("vs cuDNN", "vs_cudnn", ".2f")] + C.SHORT_CHECK)
    C.log(C.markdown_table(rows, short))
    return 0


if __name__ == "__main__":
    sys.exit(main())
