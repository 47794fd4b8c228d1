"""Causal prefill: jax_paged_attn.paged_prefill against cuDNN dense flash attention, cuDNN
paged attention and the XLA reference, in one run, with a bf16 matmul ceiling measured in
the same run.

    python benchmarks/bench_prefill.py [--quick] [--impls ours,cudnn,xla] [--out DIR]
                                       [--cpu-smoke]

Points: Hq=32 Hkv=8 D=128 bf16, page 16, every request a full causal prefill (q_len =
kv_len = L) at (B, L) = (4, 2048), (1, 8192), (1, 16384) (the last when device memory
allows). FLOPs = 4 * sum over query rows of visible keys * Hq * D (causal: L(L+1)/2 rows*keys
per request). Every peer's output is compared with ours (rel L2); ours with the reference
in float32. Writes prefill.json, prefill.md and prefill.png under --out.

--impls: "cudnn" runs both cuDNN dense (jax.nn.dot_product_attention, implementation=
"cudnn", is_causal=True, on contiguous copies of the pages) and cuDNN paged; "pallas" is
accepted and reported as skipped (the Pallas GPU paged op is decode-only).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common as C  # noqa: E402

C.add_tests_to_path()
import cases  # noqa: E402
import device_inputs as DI  # noqa: E402

IMPLS = ("ours", "cudnn", "cudnn-dense", "cudnn-paged", "pallas", "xla")
DEFAULT_IMPLS = ("ours", "cudnn", "xla")
REL_TOL = 2e-2


@dataclasses.dataclass(frozen=True)
class Point:
    batch: int
    length: int
    hq: int = 32
    hkv: int = 8
    d: int = 128
    page: int = 16

    @property
    def name(self) -> str:
        return f"{self.batch}x{self.length}"

    @property
    def config(self) -> str:
        return f"Hq{self.hq}/Hkv{self.hkv} D{self.d} p{self.page} bf16 causal"

    @property
    def flops(self) -> float:
        visible = self.length * (self.length + 1) // 2      # sum_i (i + 1)
        return 4.0 * self.batch * visible * self.hq * self.d

    def bytes_estimate(self) -> int:
        t = self.batch * self.length
        q = t * self.hq * self.d * 2
        kv = 2 * t * self.hkv * self.d * 2
        # q, out (x2 impls kept), pages, dense copies, reference working set (~2 GiB bound)
        return 4 * q + 2 * kv + 2 * C.GiB


def points(quick: bool, smoke: bool) -> list[Point]:
    if smoke:
        small = dict(hq=4, hkv=2, d=64)
        return [Point(2, 128, **small), Point(1, 256, **small)]
    pts = [Point(4, 2048), Point(1, 8192)]
    if not quick:
        pts.append(Point(1, 16384))
    return pts


@dataclasses.dataclass
class Inputs:
    q: jax.Array                  # [B*L, Hq, D]
    cache: DI.PagedCache
    cu_seqlens: jax.Array         # [B+1]


def build_inputs(pt: Point, seed: int) -> Inputs:
    kc, kq = jax.random.split(jax.random.key(seed * 104729 + 7))
    cache = DI.make_paged_cache(kc, batch=pt.batch, max_len=pt.length, num_kv_heads=pt.hkv,
                                head_dim=pt.d, page_size=pt.page)
    q = DI.random_normal(kq, (pt.batch * pt.length, pt.hq, pt.d), "bf16")
    cu = jnp.asarray(cases.cu_seqlens(np.full(pt.batch, pt.length)).astype(np.int32))
    return Inputs(q, cache, cu)


@dataclasses.dataclass
class Built:
    label: str
    fn: object
    args: tuple
    to_tokens: object
    owned: list = dataclasses.field(default_factory=list)
    note: str = ""


def _build_jpa_style(name, prefill_fn, pt, x):
    """Ours and the XLA reference share the public signature."""
    def fn(q, k, v, bt, sl, cu):
        return prefill_fn(q, k, v, bt, sl, cu, max_q_len=pt.length, causal=True)

    c = x.cache
    return [Built(name, fn, (x.q, c.k, c.v, c.block_tables, c.seq_lens, x.cu_seqlens),
                  lambda o: o)]


def build_ours(pt, x):
    import jax_paged_attn as jpa
    return _build_jpa_style("ours", jpa.paged_prefill, pt, x)


def build_xla(pt, x):
    from jax_paged_attn import reference
    return _build_jpa_style("xla", reference.paged_prefill, pt, x)


def build_cudnn_dense(pt, x):
    # jax.nn.dot_product_attention(query [B,T,N,H], key/value [B,S,K,H], *, scale,
    #   is_causal, implementation="cudnn"): GQA when N % K == 0. The pages are gathered into
    # contiguous [B, L, Hkv, D] copies outside the timed region.
    b, L, hq, d = pt.batch, pt.length, pt.hq, pt.d
    kd = DI.dense_kv(x.cache.k, x.cache.block_tables)
    vd = DI.dense_kv(x.cache.v, x.cache.block_tables)
    jax.block_until_ready((kd, vd))
    scale = 1.0 / math.sqrt(d)

    def fn(q, k, v):
        return jax.nn.dot_product_attention(q.reshape(b, L, hq, d), k, v, scale=scale,
                                            is_causal=True, implementation="cudnn")

    return [Built("cudnn-dense", fn, (x.q, kd, vd), lambda o: o.reshape(b * L, hq, d),
                  owned=[kd, vd])]


def build_cudnn_paged(pt, x):
    # jax._src.cudnn.fused_attention_stablehlo.paged_attention (private): query [B,T,N,H],
    # pools [B*blocks, block, N_kv, H] (our NHD, pool exactly B*blocks), page tables
    # [B,1,blocks,1], q_seqlen/kv_seqlen [B]. T == S here, so CAUSAL's diagonal alignment
    # does not matter; PADDING_CAUSAL is tried when CAUSAL is refused.
    from jax._src.cudnn import fused_attention_stablehlo as fa
    b, L, hq, d = pt.batch, pt.length, pt.hq, pt.d
    scale = 1.0 / math.sqrt(d)
    qs = jnp.full((b,), L, jnp.int32)
    c = x.cache
    variants = []
    for mask in (fa.MaskType.CAUSAL, fa.MaskType.PADDING_CAUSAL):
        def fn(q, k, v, bt, sl, qs, _m=mask):
            pt4 = bt.reshape(b, 1, bt.shape[1], 1)
            out = fa.paged_attention(q.reshape(b, L, hq, d), k, v, qs, sl, pt4, pt4,
                                     scale=scale, mask_type=_m, qkv_layout="BTNH")
            return out[0] if isinstance(out, (tuple, list)) else out

        variants.append(Built("cudnn-paged", fn,
                              (x.q, c.k, c.v, c.block_tables, c.seq_lens, qs),
                              lambda o: o.reshape(b * L, hq, d), note=f"mask {mask.name}"))
    return variants


def build_pallas(pt, x):
    raise C.Unsupported("Pallas GPU paged_attention is decode-only")


BUILDERS = {"ours": build_ours, "cudnn-dense": build_cudnn_dense,
            "cudnn-paged": build_cudnn_paged, "pallas": build_pallas, "xla": build_xla}


def expand_impls(names):
    out = []
    for n in names:
        for m in (("cudnn-dense", "cudnn-paged") if n == "cudnn" else (n,)):
            if m not in out:
                out.append(m)
    return out


def reference_f32(pt, x):
    from jax_paged_attn import reference
    c = x.cache
    f = jax.jit(lambda q, k, v, bt, sl, cu: reference.paged_prefill(
        q, k, v, bt, sl, cu, max_q_len=pt.length, causal=True, out_dtype=jnp.float32))
    return jax.block_until_ready(f(x.q, c.k, c.v, c.block_tables, c.seq_lens, x.cu_seqlens))


def run_impl(name, pt, x, timer):
    row = {"point": pt.name, "config": pt.config, "impl": name, "B": pt.batch,
           "L": pt.length}
    return C.run_impl(row, lambda: BUILDERS[name](pt, x), timer, compile_fn=jax.jit,
                      first_output=lambda out: out, time_kwargs=lambda built: {},
                      metrics=lambda built, t: dict(
                          flops=pt.flops, tflops=pt.flops / (t.us * 1e-6) / 1e12))


def run_point(pt, impls, timer, seed, check_ref):
    x = build_inputs(pt, seed)
    rows, outs = [], {}
    for name in impls:
        row, tok = run_impl(name, pt, x, timer)
        rows.append(row)
        if tok is not None:
            outs[name] = tok
        _print_row(row)
    ref = None
    if check_ref:
        try:
            ref = reference_f32(pt, x)
        except Exception as e:
            C.log(f"    reference (f32) failed: {C.short_error(e)}")
    C.check_rows(rows, outs, ref, REL_TOL)
    ok = [r for r in rows if "us" in r and r.get("check") != "MISMATCH"]
    dense = next((r for r in ok if r["impl"] == "cudnn-dense"), None)
    paged = next((r for r in ok if r["impl"] == "cudnn-paged"), None)
    for row in rows:
        if "us" in row:
            if dense:
                row["vs_cudnn_dense"] = dense["us"] / row["us"]
            if paged:
                row["vs_cudnn_paged"] = paged["us"] / row["us"]
    C.free(list(outs.values()), ref, x.q, x.cu_seqlens, x.cache.arrays())
    return rows


def _print_row(row):
    C.log_row(row, f"{row['tflops']:7.1f} TFLOP/s" if row.get("status") == "ok" else "",
              width=12)


COLUMNS = (C.HEAD_COLUMNS + [("TFLOP/s", "tflops", ".1f"), ("% matmul", "pct_matmul", ".1f"),
                             ("vs cuDNN dense (x)", "vs_cudnn_dense", ".2f"),
                             ("vs cuDNN paged (x)", "vs_cudnn_paged", ".2f")] + C.CHECK_COLUMNS)


def finalize(rows, matmul):
    peak = matmul.get("tflops")
    for row in rows:
        if peak and row.get("tflops"):
            row["pct_matmul"] = 100.0 * row["tflops"] / peak


def write_outputs(outdir, meta, rows, plot=False):
    C.write_json(os.path.join(outdir, "prefill.json"), {"meta": meta, "rows": rows})
    md = [f"# Causal prefill ({meta['device'].get('device_kind')}, jax {meta['device']['jax']})",
          "", f"Timer: {meta['timer']}; bf16 matmul ceiling "
          f"{C.fmt_num(meta['matmul'].get('tflops'), '.0f')} TFLOP/s ({meta['matmul'].get('n')}^3). "
          "FLOPs = 4 * sum(q_len * kv_visible) * Hq * D; 'vs' columns = peer time / time.", "",
          C.markdown_table(rows, COLUMNS), ""]
    with open(os.path.join(outdir, "prefill.md"), "w") as f:
        f.write("\n".join(md))
    if not plot:
        return ""
    return C.try_plot_bars(os.path.join(outdir, "prefill.png"), rows, "tflops",
                           ylabel="TFLOP/s (causal FLOPs)",
                           title=f"Causal prefill, {meta['device'].get('device_kind')}",
                           hline=meta["matmul"].get("tflops"),
                           hline_label="bf16 matmul ceiling")


def main(argv=None):
    p = C.base_parser(__doc__.splitlines()[0], IMPLS)
    p.set_defaults(impls=",".join(DEFAULT_IMPLS))
    p.add_argument("--no-ref-check", action="store_true",
                   help="skip the float32 reference used to check ours")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    impls = expand_impls(C.parse_impls(args.impls, IMPLS))
    outdir = C.out_dir(args.out)
    t_start = time.time()
    info = C.device_info()
    C.log(f"device: {info}")
    C.check_backend(args)
    reps = C.resolve_reps(args)
    timer = C.Timer(reps=reps, use_cupti=not args.no_cupti)
    C.log(f"timer: CUPTI {timer.cupti_status}; {reps} samples per measurement")
    matmul = C.measure_matmul_ceiling(timer, 256 if args.cpu_smoke else 8192)
    C.log(f"bf16 matmul ceiling: {C.fmt_num(matmul.get('tflops'), '.1f')} TFLOP/s "
          f"{matmul.get('error', '')}")

    meta = {"device": info, "timer": f"CUPTI {timer.cupti_status}", "reps": reps,
            "matmul": matmul, "impls": impls, "argv": sys.argv[1:]}
    limit = C.device_memory_limit()

    def too_big(pt):
        if limit and pt.bytes_estimate() > 0.8 * limit:
            return (f"skipped: needs ~{pt.bytes_estimate() / C.GiB:.1f} GiB of "
                    f"{limit / C.GiB:.1f} GiB")
        return None

    rows = C.run_points(
        points(args.quick, args.cpu_smoke), t_start=t_start, budget_s=args.budget_s,
        run_one=lambda i, pt: run_point(pt, impls, timer, args.seed + i,
                                        not args.no_ref_check),
        base_row=lambda pt: {"point": pt.name, "config": pt.config, "B": pt.batch,
                             "L": pt.length},
        after_point=lambda rows: (finalize(rows, matmul), write_outputs(outdir, meta, rows)),
        skip_reason=too_big)

    meta["total_s"] = time.time() - t_start
    finalize(rows, matmul)
    why = write_outputs(outdir, meta, rows, plot=True)
    C.log("")
    C.log(f"bf16 matmul ceiling {C.fmt_num(matmul.get('tflops'), '.0f')} TFLOP/s; timer CUPTI "
          f"{timer.cupti_status}; {reps} samples; total {meta['total_s']:.0f}s")
    if why:
        C.log(f"(no PNG: {why})")
    C.log(f"outputs in {outdir}: prefill.json, prefill.md" + ("" if why else ", prefill.png"))
    C.log("")
    short = (C.SHORT_HEAD + [("TFLOP/s", "tflops", ".1f"), ("%matmul", "pct_matmul", ".1f"),
                             ("vs dense", "vs_cudnn_dense", ".2f"),
                             ("vs paged", "vs_cudnn_paged", ".2f")] + C.SHORT_CHECK)
    C.log(C.markdown_table(rows, short))
    return 0


if __name__ == "__main__":
    sys.exit(main())
