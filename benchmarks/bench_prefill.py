"""Prefill: jax_paged_attn.paged_prefill against cuDNN dense flash attention, cuDNN paged
attention and the XLA reference, in one run, with a bf16 matmul ceiling measured in the
same run.

    python benchmarks/bench_prefill.py [--quick] [--impls ours,ours-sm80,cudnn,xla] [--out DIR]
                                       [--cpu-smoke] [--fit]

Points (Hq=32 Hkv=8 D=128 bf16 page 16 causal unless named): full causal prefills (q_len =
kv_len = L) at (B, L) = (4, 2048), (1, 8192), (1, 16384) (--quick: the first two); then at
1x8192 non-causal, page 1, page 64, D=64, D=256 and fp8 pages; a chunked-prefill step (B=8,
512 new tokens over 8192 cached) and a ragged batch (B=16, q lens U[1, 2048]). FLOPs = 4 *
sum over query rows of visible keys * Hq * D. The mixed point: 56 decode requests (KV
U[1k, 8k]) and 8 chunks of 512 over 2k cached, in one call. Every peer's output is compared
with ours (rel L2); ours with the reference in float32. --fit runs only non-causal
1 x 2k / 4k / 8k / 16k and fits ours' time per CTA as a fixed part plus a part per key tile
(sm90 D=128 CTA shape). Writes prefill.json, prefill.md and prefill.png under --out.

--impls: "ours" is the default launch (the sm90 wgmma family for 16-bit-page prefill on a
Hopper card, when the build has it); "ours-sm80" is ours with the portable sm80 family forced
(JPA_CUDA_FAMILY=sm80); "ours-mixed" ours with the mixed-batch split
launch (JPA_CUDA_MIXED=1); "ours-separate" (mixed point only) the same requests as a decode
call plus a prefill call. "cudnn" runs both cuDNN dense
(jax.nn.dot_product_attention, implementation="cudnn", on contiguous copies of the pages, q
padded to the longest request) and cuDNN paged. fp8 points give the peers bf16 copies of the
pages. JAX's cuDNN calls align causal masks top-left, so the chunked point runs them
non-causal (each row sees every key: a little more work than the causal chunk) and checks
every output on the last row of each request. "pallas" is accepted and reported as skipped
(the Pallas GPU paged op is decode-only).
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
from jax_paged_attn import launch_options  # noqa: E402

C.add_tests_to_path()
import cases  # noqa: E402
import device_inputs as DI  # noqa: E402

IMPLS = ("ours", "ours-sm80", "ours-mixed", "ours-separate", "cudnn", "cudnn-dense",
         "cudnn-paged", "pallas", "xla")
DEFAULT_IMPLS = ("ours", "ours-sm80", "ours-mixed", "ours-separate", "cudnn", "xla")
# Rows run with the launcher's switches set (read when the call is lowered: set around the
# row's whole build / compile / time, each row its own jit): the sm80 family forced; the
# mixed-batch split launch.
IMPL_ENV = {"ours-sm80": {"JPA_CUDA_FAMILY": "sm80"}, "ours-mixed": {"JPA_CUDA_MIXED": "1"}}
REL_TOL = 2e-2


@dataclasses.dataclass(frozen=True)
class Point:
    """One benchmark point. Each request has q new tokens over `cached` tokens already in
    the cache (kv = cached + q): a full prefill has cached 0, a chunked-prefill step a chunk
    over a long context. `ragged`: q lens U[1, q_len] (seeded), else all q_len."""
    batch: int
    q_len: int
    hq: int = 32
    hkv: int = 8
    d: int = 128
    page: int = 16
    causal: bool = True
    kv: str = "bf16"             # page dtype: "bf16" or "fp8" (scales 0.5)
    cached: int = 0
    ragged: bool = False
    decode: int = 0              # the first `decode` requests are decode tokens (q_len 1)
    label: str = ""

    @property
    def name(self) -> str:
        shape = f"{self.batch}x{self.q_len}" + (f"+{self.cached}" if self.cached else "")
        return f"{self.label} {shape}" if self.label else shape

    @property
    def config(self) -> str:
        return (f"Hq{self.hq}/Hkv{self.hkv} D{self.d} p{self.page} {self.kv} "
                + ("causal" if self.causal else "non-causal")
                + (" ragged q~U[1,%d]" % self.q_len if self.ragged else ""))

    def lens(self) -> tuple[np.ndarray, np.ndarray]:
        """(q_lens, kv_lens) int32 [B]. A mixed batch's decode requests have KV lengths
        U[1024, 8192] (seeded), its chunks `cached` tokens before them."""
        if self.ragged:
            q = cases.uniform_seq_lens(1234 + self.batch, self.batch, 1, self.q_len)
        else:
            q = np.full(self.batch, self.q_len, np.int32)
        kv = (q + self.cached).astype(np.int32)
        if self.decode:
            q[:self.decode] = 1
            kv[:self.decode] = cases.uniform_seq_lens(77, self.decode, 1024, 8192)
        return q, kv

    @property
    def flops(self) -> float:
        q, kv = (x.astype(np.int64) for x in self.lens())
        # causal (bottom-right): row i of a request sees kv - q + i + 1 keys
        visible = (q * (kv - q) + q * (q + 1) // 2) if self.causal else q * kv
        return 4.0 * float(visible.sum()) * self.hq * self.d

    @property
    def exact_cudnn_mask(self) -> bool:
        """JAX's cuDNN calls align causal masks top-left; with q == kv that is our bottom-right
        mask. A chunk over cached context gets the peers' non-causal mask instead (every row
        sees every key: a little more work than ours), checked on the last row of each
        request, which sees every key under both masks."""
        return not (self.causal and self.cached)

    def bytes_estimate(self) -> int:
        q, kv = self.lens()
        t = int(q.sum())
        qb = t * self.hq * self.d * 2
        kvb = 2 * int(kv.sum()) * self.hkv * self.d * 2
        # q, out (x2 impls kept), pages, dense copies, reference working set (~2 GiB bound)
        return 4 * qb + 2 * kvb + 2 * C.GiB


# --fit: non-causal single requests, so every CTA of a launch has the same key tiles; the time
# per CTA against key tiles per CTA splits the kernel's cost into a fixed part per CTA (launch,
# Q staging, the ring's fill, the first tiles' wait, the epilogue) and a part per key tile.
FIT_LENS = (2048, 4096, 8192, 16384)
FIT_SMOKE_LENS = (64, 128, 256)
# The sm90 D=128 CTA shape (docs/cuda_kernels.md): 128 packed query rows, key tiles of 128.
FIT_BM, FIT_BN = 128, 128


def fit_points(smoke: bool) -> list[Point]:
    if smoke:
        return [Point(1, n, hq=4, hkv=2, d=64, causal=False, label="fit") for n in FIT_SMOKE_LENS]
    return [Point(1, n, causal=False, label="fit") for n in FIT_LENS]


def fit_per_cta(rows, pts: dict, impl: str, num_sms: int) -> dict | None:
    """Least-squares line through (key tiles per CTA, us per CTA) of `impl`'s fit rows,
    with FIT_BM x FIT_BN CTAs, one per SM at a time: a launch of N equal CTAs takes
    ceil(N / num_sms) rounds. Returns {"fixed_us", "per_tile_us", "tile_tflops", "points"}
    (tile_tflops: the rate of the per-tile part alone, over the whole card), or None with
    fewer than two usable rows."""
    xs, ys, used = [], [], []
    for r in rows:
        pt = pts.get(r.get("point"))
        if r.get("impl") != impl or pt is None or pt.label != "fit" or not r.get("us"):
            continue
        ctas = pt.hkv * math.ceil(pt.q_len * (pt.hq // pt.hkv) / FIT_BM)
        tiles = math.ceil(pt.q_len / FIT_BN)
        per_cta = r["us"] / math.ceil(ctas / num_sms)
        xs.append(tiles)
        ys.append(per_cta)
        used.append({"point": r["point"], "ctas": ctas, "tiles": tiles, "us_per_cta": per_cta,
                     "d": pt.d})
    if len(set(xs)) < 2:
        return None
    b, a = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    flops_tile = 4.0 * FIT_BM * FIT_BN * used[0]["d"]  # one CTA's key tile
    return {"fixed_us": float(a), "per_tile_us": float(b),
            "tile_tflops": flops_tile * num_sms / (b * 1e-6) / 1e12 if b > 0 else None,
            "points": used}


def fit_text(impl: str, f: dict, num_sms: int) -> str:
    return (f"fit {impl} ({num_sms} SMs, {FIT_BM}x{FIT_BN} CTAs): {f['fixed_us']:.2f} us per "
            f"CTA + {f['per_tile_us']:.3f} us per key tile "
            f"({C.fmt_num(f['tile_tflops'], '.0f')} TFLOP/s for the per-tile part)")


def points(quick: bool, smoke: bool) -> list[Point]:
    if smoke:
        small = dict(hq=4, hkv=2, d=64)
        return [Point(2, 128, **small), Point(1, 256, **small),
                Point(2, 64, cached=100, label="chunked", **small),
                Point(3, 90, ragged=True, page=5, label="ragged", **small),
                Point(1, 128, kv="fp8", label="fp8", **small),
                Point(6, 48, cached=40, decode=4, label="mixed", **small)]
    pts = [Point(4, 2048), Point(1, 8192)]
    if quick:
        return pts
    return pts + [
        Point(1, 16384),
        Point(1, 8192, causal=False, label="non-causal"),
        Point(1, 8192, page=1, label="page 1"),
        Point(1, 8192, page=64, label="page 64"),
        Point(1, 8192, d=64, label="D=64"),
        Point(1, 8192, d=256, label="D=256"),
        Point(1, 8192, kv="fp8", label="fp8 pages"),
        Point(8, 512, cached=8192, label="chunked"),
        Point(16, 2048, ragged=True, label="ragged"),
        # the issue's mixed batch: 56 decode requests + 8 chunks of 512 over 2k cached
        Point(64, 512, cached=2048, decode=56, label="mixed"),
    ]


def select(pts: list[Point], only: str) -> list[Point]:
    """The points --only names: comma-separated substrings of a point's name, or "=name" for
    exactly that name; all of them for an empty string."""
    words = [w for w in only.split(",") if w]
    return [pt for pt in pts
            if not words or any(w[1:] == pt.name if w.startswith("=") else w in pt.name
                                for w in words)]


@dataclasses.dataclass
class Inputs:
    q: jax.Array                  # [T, Hq, D], T = sum of q lens
    cache: DI.PagedCache
    cu_seqlens: jax.Array         # [B+1]
    q_lens: np.ndarray
    kv_lens: np.ndarray


@dataclasses.dataclass
class Built:
    label: str
    fn: object
    args: tuple
    to_tokens: object
    owned: list = dataclasses.field(default_factory=list)
    note: str = ""


def build_inputs(pt: Point, seed: int) -> Inputs:
    kc, kq = jax.random.split(jax.random.key(seed * 104729 + 7))
    q_lens, kv_lens = pt.lens()
    cache = DI.make_paged_cache(kc, batch=pt.batch, max_len=int(kv_lens.max()),
                                num_kv_heads=pt.hkv, head_dim=pt.d, page_size=pt.page,
                                dtype=pt.kv, seq_lens=kv_lens)
    q = DI.random_normal(kq, (int(q_lens.sum()), pt.hq, pt.d), "bf16")
    cu = jnp.asarray(cases.cu_seqlens(q_lens).astype(np.int32))
    return Inputs(q, cache, cu, q_lens, kv_lens)


def _padding(x: Inputs):
    """(gather [B, Lq] of token rows, T meaning a zero row; unpad [T] into the flat padded
    rows) between the packed tokens and a [B, Lq] padded batch."""
    b, lq, t = len(x.q_lens), int(x.q_lens.max()), int(x.q_lens.sum())
    cu = cases.cu_seqlens(x.q_lens)
    gather = np.full((b, lq), t, np.int64)
    for i in range(b):
        gather[i, :x.q_lens[i]] = np.arange(cu[i], cu[i + 1])
    unpad = np.concatenate([i * lq + np.arange(x.q_lens[i]) for i in range(b)])
    return gather, unpad


def _padded_q(x: Inputs):
    gather, unpad = _padding(x)
    qz = jnp.concatenate([x.q, jnp.zeros((1,) + x.q.shape[1:], x.q.dtype)])
    q_pad = jax.block_until_ready(qz[jnp.asarray(gather)])
    hq, d = x.q.shape[1:]
    return q_pad, lambda o: o.reshape(-1, hq, d)[jnp.asarray(unpad)]


def _scales(pt):
    return dict(k_scale=0.5, v_scale=0.5) if pt.kv == "fp8" else {}


def _build_jpa_style(name, prefill_fn, pt, x):
    """Ours and the XLA reference share the public signature."""
    max_q = int(x.q_lens.max())

    def fn(q, k, v, bt, sl, cu):
        return prefill_fn(q, k, v, bt, sl, cu, max_q_len=max_q, causal=pt.causal,
                          **_scales(pt))

    c = x.cache
    return [Built(name, fn, (x.q, c.k, c.v, c.block_tables, c.seq_lens, x.cu_seqlens),
                  lambda o: o)]


def build_ours(pt, x, name="ours"):
    # Also the rows that differ from ours only by the launcher's switches (IMPL_ENV, set by
    # run_impl around the row's whole build / compile / time).
    import jax_paged_attn as jpa
    return _build_jpa_style(name, jpa.paged_prefill, pt, x)


def build_ours_sm80(pt, x):
    # Ours with the launcher's portable sm80 family (mma.sync) forced.
    if jax.devices()[0].platform != "gpu":
        raise C.Unsupported("the sm80 family is a CUDA kernel")
    return build_ours(pt, x, "ours-sm80")


def build_ours_separate(pt, x):
    # A mixed batch as two calls: paged_decode over its decode requests, paged_prefill over
    # its chunks (the baseline the one mixed call must not lose to).
    import jax_paged_attn as jpa
    if not pt.decode:
        raise C.Unsupported("only for mixed batches")
    n, c = pt.decode, x.cache
    max_q = int(x.q_lens[n:].max())

    def fn(q, k, v, bt, sl, cu):
        dec = jpa.paged_decode(q[:n], k, v, bt[:n], sl[:n], **_scales(pt))
        pre = jpa.paged_prefill(q[n:], k, v, bt[n:], sl[n:], cu[n:] - n, max_q_len=max_q,
                                **_scales(pt))
        return jnp.concatenate([dec, pre])

    return [Built("ours-separate", fn, (x.q, c.k, c.v, c.block_tables, c.seq_lens,
                                        x.cu_seqlens), lambda o: o)]


def build_xla(pt, x):
    from jax_paged_attn import reference
    return _build_jpa_style("xla", reference.paged_prefill, pt, x)


def _bf16_pages(x):
    """The pages peers read: fp8 caches as their bf16 dequantized copies."""
    c = x.cache
    return (c.k_deq, c.v_deq) if c.k_deq is not None else (c.k, c.v)


def _note(pt):
    notes = []
    if pt.kv == "fp8":
        notes.append("bf16 copies of the fp8 pages")
    if not pt.exact_cudnn_mask:
        notes.append("non-causal mask, checked on last rows")
    return "; ".join(notes)


def build_cudnn_dense(pt, x):
    # jax.nn.dot_product_attention(query [B,T,N,H], key/value [B,S,K,H], *, scale,
    #   is_causal, query_seq_lengths, key_value_seq_lengths, implementation="cudnn"): GQA when
    # N % K == 0. The pages are gathered into contiguous [B, S, Hkv, D] copies and q padded to
    # [B, max q, Hq, D] outside the timed region.
    k_pages, v_pages = _bf16_pages(x)
    kd = DI.dense_kv(k_pages, x.cache.block_tables)
    vd = DI.dense_kv(v_pages, x.cache.block_tables)
    q_pad, unpad = _padded_q(x)
    scale = 1.0 / math.sqrt(pt.d)
    lens = {}
    if pt.ragged or kd.shape[1] != int(x.kv_lens.max()) or np.any(x.kv_lens != x.kv_lens[0]):
        # padded rows or keys past a request's end (the last page's tail)
        lens = dict(query_seq_lengths=jnp.asarray(x.q_lens),
                    key_value_seq_lengths=jnp.asarray(x.kv_lens))
    causal = pt.causal and pt.exact_cudnn_mask

    # Without a GPU (--cpu-smoke) XLA's implementation stands in, so the padding and the
    # masks of this path are exercised on the CPU too (the row says so).
    impl = "cudnn" if C.on_gpu() else "xla"

    def fn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                            implementation=impl, **lens)

    note = "; ".join(n for n in (_note(pt), "" if impl == "cudnn" else "XLA stand-in") if n)
    return [Built("cudnn-dense", fn, (q_pad, kd, vd), unpad, owned=[kd, vd, q_pad],
                  note=note)]


def build_cudnn_paged(pt, x):
    # jax._src.cudnn.fused_attention_stablehlo.paged_attention (private): query [B,T,N,H],
    # pools [B*blocks, block, N_kv, H] (our NHD, pool exactly B*blocks), page tables
    # [B,1,blocks,1], q_seqlen/kv_seqlen [B]. Its causal masks align top-left (ours
    # bottom-right), which agree when q == kv; PADDING_CAUSAL is tried when CAUSAL is refused.
    from jax._src.cudnn import fused_attention_stablehlo as fa
    scale = 1.0 / math.sqrt(pt.d)
    qs = jnp.asarray(x.q_lens)
    c = x.cache
    k_pages, v_pages = _bf16_pages(x)
    q_pad, unpad = _padded_q(x)
    b = pt.batch
    masks = ((fa.MaskType.CAUSAL, fa.MaskType.PADDING_CAUSAL)
             if pt.causal and pt.exact_cudnn_mask else (fa.MaskType.NO_MASK, fa.MaskType.PADDING))
    variants = []
    for mask in masks:
        def fn(q, k, v, bt, sl, qs, _m=mask):
            pt4 = bt.reshape(b, 1, bt.shape[1], 1)
            out = fa.paged_attention(q, k, v, qs, sl, pt4, pt4, scale=scale, mask_type=_m,
                                     qkv_layout="BTNH")
            return out[0] if isinstance(out, (tuple, list)) else out

        note = "; ".join(n for n in (f"mask {mask.name}", _note(pt)) if n)
        variants.append(Built("cudnn-paged", fn,
                              (q_pad, k_pages, v_pages, c.block_tables, c.seq_lens, qs),
                              unpad, owned=[q_pad], note=note))
    return variants


def build_pallas(pt, x):
    raise C.Unsupported("Pallas GPU paged_attention is decode-only")


BUILDERS = {"ours": build_ours, "ours-sm80": build_ours_sm80,
            "ours-mixed": lambda pt, x: build_ours(pt, x, "ours-mixed"),
            "ours-separate": build_ours_separate, "cudnn-dense": build_cudnn_dense,
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
    max_q = int(x.q_lens.max())
    f = jax.jit(lambda q, k, v, bt, sl, cu: reference.paged_prefill(
        q, k, v, bt, sl, cu, max_q_len=max_q, causal=pt.causal, out_dtype=jnp.float32,
        **_scales(pt)))
    return jax.block_until_ready(f(x.q, c.k, c.v, c.block_tables, c.seq_lens, x.cu_seqlens))


def run_impl(name, pt, x, timer):
    row = {"point": pt.name, "config": pt.config, "impl": name, "B": pt.batch,
           "L": pt.q_len}
    with launch_options.switched(IMPL_ENV.get(name, {})):
        return _run_impl(name, row, pt, x, timer)


def _run_impl(name, row, pt, x, timer):
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
    if not pt.exact_cudnn_mask:
        # the peers ran another mask: compare every output on the rows where both agree
        last = jnp.asarray(cases.cu_seqlens(x.q_lens)[1:] - 1)
        outs = {k: v[last] for k, v in outs.items()}
        ref = None if ref is None else ref[last]
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
    md = [f"# Prefill ({meta['device'].get('device_kind')}, jax {meta['device']['jax']})",
          "", f"Timer: {meta['timer']}; bf16 matmul ceiling "
          f"{C.fmt_num(meta['matmul'].get('tflops'), '.0f')} TFLOP/s ({meta['matmul'].get('n')}^3). "
          "FLOPs = 4 * sum(q_len * kv_visible) * Hq * D; 'vs' columns = peer time / time.", "",
          C.markdown_table(rows, COLUMNS), ""]
    for impl, f in (meta.get("fit") or {}).items():
        if f:
            per_point = "; ".join(f"{q['point']}: {q['ctas']} CTAs x {q['tiles']} tiles, "
                                  f"{q['us_per_cta']:.2f} us per CTA" for q in f["points"])
            md += [f"{fit_text(impl, f, meta['fit_num_sms'])}. {per_point}", ""]
    with open(os.path.join(outdir, "prefill.md"), "w") as f:
        f.write("\n".join(md))
    if not plot:
        return ""
    return C.try_plot_bars(os.path.join(outdir, "prefill.png"), rows, "tflops",
                           ylabel="TFLOP/s (causal FLOPs)",
                           title=f"Prefill, {meta['device'].get('device_kind')}",
                           hline=meta["matmul"].get("tflops"),
                           hline_label="bf16 matmul ceiling")


def main(argv=None):
    p = C.base_parser(__doc__.splitlines()[0], IMPLS)
    p.set_defaults(impls=",".join(DEFAULT_IMPLS))
    p.add_argument("--no-ref-check", action="store_true",
                   help="skip the float32 reference used to check ours")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fit", action="store_true",
                   help="only the non-causal fit points (1 x 2k-16k): ours' time per CTA "
                        "split into a fixed part and a part per key tile")
    p.add_argument("--only", default="",
                   help="comma-separated substrings: run only the points whose name has one "
                        "(=NAME: exactly that point)")
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

    pts = fit_points(args.cpu_smoke) if args.fit else points(args.quick, args.cpu_smoke)
    chosen = select(pts, args.only)
    rows = C.run_points(
        chosen, t_start=t_start, budget_s=args.budget_s,
        run_one=lambda i, pt: run_point(pt, impls, timer, args.seed + i,
                                        not args.no_ref_check),
        base_row=lambda pt: {"point": pt.name, "config": pt.config, "B": pt.batch,
                             "L": pt.q_len},
        after_point=lambda rows: (finalize(rows, matmul), write_outputs(outdir, meta, rows)),
        skip_reason=too_big)

    meta["total_s"] = time.time() - t_start
    finalize(rows, matmul)
    if args.fit:
        num_sms = getattr(jax.devices()[0], "core_count", None) or 132
        by_name = {pt.name: pt for pt in chosen}
        meta["fit"] = {impl: fit_per_cta(rows, by_name, impl, num_sms) for impl in impls
                       if impl.startswith("ours")}
        meta["fit_num_sms"] = num_sms
        for impl, f in meta["fit"].items():
            if f:
                C.log(fit_text(impl, f, num_sms))
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
