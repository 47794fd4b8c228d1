"""Random-configuration fuzzing of paged_decode / paged_prefill against the reference.

Plain numpy, no test framework, so the CPU suite (tests/test_fuzz.py) and the GPU script
(scripts/gpu_fuzz.py) run the same generator. A case is two seeds:

* the *config* seed draws everything static — op, batch, heads, group, head_dim, page size,
  dtypes, page layout, window, soft cap, sinks, scales, q_len_per_req / causal / max_q_len,
  how q is passed (dense, a `split_qkv` view, a head-major strided view), a stacked cache
  with a static or traced layer, return_lse, out_dtype — and fixes every operand shape;
* the *draw* seed draws everything at run time inside those shapes — ragged q and KV
  lengths, block tables, values, and (for some draws) broken metadata: one rule of
  docs/semantics.md ("Invalid runtime metadata") violated in chosen requests.

Fixed shapes per config mean every draw of a config reuses the same compiled op and
reference, which is what makes 1,000 cases fit in a few CPU minutes. `check` compares against
the float32 reference and, independently of it, against the plain-Python oracle of
`cases.invalid_requests`: NaN rows exactly in the invalid requests, every other row within
tolerance, padding rows 0 / lse -inf. `Case.repro()` is the line that reproduces a failure.
"""

from __future__ import annotations

import dataclasses

import numpy as np

import cases

CPU_HEAD_DIMS = (8, 16, 32)
GPU_HEAD_DIMS = (64, 128, 256)
INVALID_RULES = ("page", "capacity", "negative_len", "short_len", "cu_order", "cu_past_end",
                 "q_len_over_max", "layer")


@dataclasses.dataclass(frozen=True)
class Config:
    """The static part of a fuzz case: an AttnCase plus how operands are passed."""

    case: cases.AttnCase
    q_view: str            # "dense" | "split_qkv" | "head_major"
    num_layers: int        # 0: a plain cache; else a stack [num_layers, ...]
    traced_layer: bool
    invalid_rate: float    # probability that a draw breaks some metadata
    # fixed operand shapes (every draw is padded to these)
    num_tokens: int
    max_pages: int
    num_pages: int
    max_q_len: int         # prefill: the static max_q_len kwarg


def draw_config(seed: int, *, gpu: bool = False) -> Config:
    rng = np.random.default_rng([seed, 0xC0F])
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    kind = pick(("decode", "prefill"))
    q_dtypes = ("bf16", "f16") if gpu else ("f32", "bf16", "f16")
    kv_dtypes = ("bf16", "f16", "fp8") if gpu else ("f32", "bf16", "f16", "fp8")
    kv_dtype = pick(kv_dtypes)
    q_dtype = pick(q_dtypes)
    if gpu and kv_dtype != "fp8":
        kv_dtype = q_dtype          # the GPU kernels take pages of q's dtype or fp8
    page_size = int(pick((1, 2, 3, 5, 7, 16, 32) if not gpu else (1, 5, 16, 32, 64)))
    kw = dict(
        kind=kind,
        batch=int(rng.integers(1, 7)),
        num_kv_heads=int(pick((1, 2, 3))),
        group=int(pick((1, 2, 3, 4, 5, 8))),
        head_dim=int(pick(GPU_HEAD_DIMS if gpu else CPU_HEAD_DIMS)),
        page_size=page_size,
        q_dtype=q_dtype, kv_dtype=kv_dtype,
        kv_layout=pick(("NHD", "HND")), combined=bool(rng.integers(2)),
        window_left=int(pick((-1, -1, -1, 0, 1, 4, 17))),
        logits_soft_cap=pick((None, None, None, 0.7, 5.0)),
        sinks=bool(rng.integers(3) == 0),
        return_lse=bool(rng.integers(4) > 0),
        scale=pick((None, None, round(float(rng.uniform(0.05, 0.6)), 3))),
        out_dtype=pick((None, None, "f32", "bf16", "f16") if not gpu else (None, None, "f32")),
        max_kv_len=int(rng.integers(1, 70 if not gpu else 300)),
        garbage_tables=bool(rng.integers(4) > 0),
    )
    if kv_dtype == "fp8" or rng.integers(4) == 0:
        kw["k_scale"] = round(float(rng.uniform(0.2, 2.0)), 3)
        kw["v_scale"] = round(float(rng.uniform(0.2, 2.0)), 3)
    if kind == "decode":
        kw["q_len_per_req"] = int(pick((1, 1, 1, 2, 3, 4)))
        kw["max_kv_len"] = max(kw["max_kv_len"], kw["q_len_per_req"])
    else:
        kw["causal"] = bool(rng.integers(4) > 0)
        kw["max_q_len"] = int(rng.integers(1, 10 if not gpu else 130))
        kw["max_kv_len"] = max(kw["max_kv_len"], kw["max_q_len"])
        kw["zero_q_lens"] = bool(rng.integers(3) == 0)
        kw["pad_front"] = int(pick((0, 0, 1, 3)))
        kw["max_q_len_slack"] = int(pick((0, 0, 2)))
    case = cases.AttnCase(**kw)
    num_layers = int(pick((0, 0, 0, 1, 3)))
    pages_per_req = -(-case.max_kv_len // page_size)
    if kind == "decode":
        num_tokens = case.batch * case.q_len_per_req
        max_q = case.q_len_per_req
    else:
        max_q = case.max_q_len + case.max_q_len_slack
        num_tokens = case.pad_front + case.batch * case.max_q_len + int(rng.integers(0, 4))
    return Config(
        case=case, q_view=pick(("dense", "split_qkv", "head_major")), num_layers=num_layers,
        traced_layer=bool(num_layers and rng.integers(2)),
        invalid_rate=float(pick((0.0, 0.3, 0.5))),
        num_tokens=num_tokens, max_pages=pages_per_req + 1 + int(rng.integers(0, 2)),
        num_pages=case.batch * pages_per_req + case.extra_pages + int(rng.integers(0, 3)),
        max_q_len=max_q)


@dataclasses.dataclass
class Case:
    """One drawn case: numpy operands in the config's fixed shapes, ready to run."""

    config_seed: int
    draw_seed: int
    config: Config
    inputs: cases.Inputs       # metadata/values after padding and mutation (NHD logical pages)
    layer: int                 # the layer attended to (may be out of range when broken)
    broken: tuple              # names of the rules this draw violated

    def repro(self) -> str:
        return f"fuzz case config={self.config_seed} draw={self.draw_seed}"


def _pad_pool(rng, inp, num_pages):
    """Grow the pool to `num_pages` with fresh random pages (stored K, V in NHD order)."""
    c = inp.case
    extra = num_pages - inp.num_pages
    assert extra >= 0, (num_pages, inp.num_pages)
    k_more, v_more = cases.make_pages(rng, extra, c.page_size, c.num_kv_heads, c.head_dim,
                                      c.kv_dtype)
    return (np.concatenate([inp.k_logical, k_more]), np.concatenate([inp.v_logical, v_more]))


def _mutate(rng, inp, cfg: Config, k_nhd_pages):
    """Break one rule in one or two requests; returns (block_tables, seq_lens, cu, rules)."""
    c = inp.case
    bt = np.array(inp.block_tables, np.int64)
    sl = np.array(inp.seq_lens, np.int64)
    cu = None if inp.cu_seqlens_q is None else np.array(inp.cu_seqlens_q, np.int64)
    P, ps, M, T = cfg.num_pages, c.page_size, cfg.max_pages, cfg.num_tokens
    rules = []
    for b in rng.choice(c.batch, size=min(c.batch, int(rng.integers(1, 3))), replace=False):
        b = int(b)
        q_len = c.q_len_per_req if cu is None else int(cu[b + 1] - cu[b])
        options = ["capacity", "negative_len"]
        L = int(sl[b])
        lo = cases.first_needed_key(L, q_len, c.window_left)
        if q_len > 0 and L > lo:
            options.append("page")
        if q_len > 0:
            options.append("short_len")
        if cu is not None:
            options += ["cu_order", "q_len_over_max"]
            if b == c.batch - 1:
                options.append("cu_past_end")
        if cfg.traced_layer:
            options.append("layer")
        rule = options[int(rng.integers(len(options)))]
        if rule == "page":
            p = int(rng.integers(lo // ps, (L - 1) // ps + 1))
            bt[b, p] = int(rng.choice([-1, P, P + 5, -(2**31), 2**31 - 1]))
        elif rule == "capacity":
            sl[b] = M * ps + int(rng.integers(1, 4))
        elif rule == "negative_len":
            sl[b] = -int(rng.integers(1, 5))
        elif rule == "short_len":
            sl[b] = q_len - int(rng.integers(1, q_len + 1))
        elif rule == "cu_order":
            # the end goes below the start (q_len < 0), or the start below an earlier end
            if rng.integers(2) or b == 0:
                cu[b + 1] = cu[b] - int(rng.integers(1, 3))
            else:
                cu[b] = cu[b - 1] - 1 if cu[b - 1] >= 1 else -1
        elif rule == "cu_past_end":
            cu[b + 1] = T + int(rng.integers(1, 4))
        elif rule == "q_len_over_max":
            cu[b + 1] = cu[b] + cfg.max_q_len + 1
        rules.append(rule)
    return bt, sl, cu, tuple(rules)


def draw_case(config_seed: int, draw_seed: int, *, gpu: bool = False) -> Case:
    cfg = draw_config(config_seed, gpu=gpu)
    c = dataclasses.replace(cfg.case, seed=int(np.random.default_rng(
        [config_seed, draw_seed]).integers(2**31)))
    rng = np.random.default_rng([config_seed, draw_seed, 1])
    inp = cases.make_inputs(c)
    # Pad every operand to the config's fixed shapes.
    k_nhd, v_nhd = _pad_pool(rng, inp, cfg.num_pages)
    bt = np.asarray(inp.block_tables)
    cols = cfg.max_pages - bt.shape[1]
    assert cols >= 0, (cfg.max_pages, bt.shape)
    filler = rng.choice(np.array(cases.GARBAGE_PAGES, np.int64), size=(bt.shape[0], cols))
    bt = np.concatenate([bt, filler.astype(np.int32)], axis=1)
    q = np.asarray(inp.q)
    rows = cfg.num_tokens - q.shape[0]
    assert rows >= 0, (cfg.num_tokens, q.shape)
    q = np.concatenate([q, cases._rand(rng, (rows,) + q.shape[1:], q.dtype)])
    kwargs = dict(inp.kwargs)
    if c.kind == "prefill":
        kwargs["max_q_len"] = cfg.max_q_len
    inp = dataclasses.replace(inp, num_pages=cfg.num_pages, k_logical=k_nhd, v_logical=v_nhd,
                              kwargs=kwargs)
    inp = inp.with_args(q=q, block_tables=bt)
    broken = ()
    layer = int(rng.integers(max(cfg.num_layers, 1)))
    if rng.random() < cfg.invalid_rate:
        bt, sl, cu, broken = _mutate(rng, inp, cfg, k_nhd)
        if "layer" in broken:
            layer = int(rng.choice([-1, cfg.num_layers, cfg.num_layers + 2]))
        changes = dict(block_tables=bt.astype(np.int32), seq_lens=sl.astype(np.int32))
        if cu is not None:
            changes["cu_seqlens_q"] = cu.astype(np.int32)
        inp = inp.with_args(**changes)
    inp = dataclasses.replace(inp, row_owner=None)   # no longer meaningful after mutation
    return Case(config_seed, draw_seed, cfg, inp, layer, broken)


# ----------------------------------------------------------------------------- operands


def _q_operand(case: Case, jpa, put):
    """q as the config says: a dense array or a view of a larger base holding it."""
    q = case.inputs.q
    t, h, d = q.shape
    kind = case.config.q_view
    rng = np.random.default_rng([case.config_seed, case.draw_seed, 2])
    if kind == "dense":
        return put(q)
    if kind == "split_qkv":
        hkv = max(1, h // 2)
        packed = cases._rand(rng, (t, h + 2 * hkv, d), q.dtype)
        packed[:, :h] = q
        return jpa.split_qkv(put(packed.reshape(t, -1)), h, hkv)[0]
    # head-major: base [h, t + 2, d + 3], the view walks tokens with stride d + 3
    base = cases._rand(rng, (h, t + 2, d + 3), q.dtype)
    base[:, 1:t + 1, 2:2 + d] = q.transpose(1, 0, 2)
    return jpa.StridedView(put(base), (t, h, d), (d + 3, (t + 2) * (d + 3), 1), d + 3 + 2)


def _page_operands(case: Case, put):
    """(k_pages, v_pages) in the config's layout; a stack with the case's pages at its
    layer (random pages elsewhere) when the config stacks layers."""
    c, inp, cfg = case.config.case, case.inputs, case.config
    k, v = cases.pack_pages(inp.k_logical, inp.v_logical, c.kv_layout, c.combined)
    if cfg.num_layers:
        rng = np.random.default_rng([case.config_seed, case.draw_seed, 3])
        def stack(x):
            if x is None:
                return None
            layers = [cases._rand(rng, x.shape, x.dtype) for _ in range(cfg.num_layers)]
            if 0 <= case.layer < cfg.num_layers:
                layers[case.layer] = x
            return np.stack(layers)
        k, v = stack(k), stack(v)
    return put(k), (None if v is None else put(v))


def run(case: Case, impl, jpa, put, *, float32_oracle: bool = False, pages=None):
    """Calls `impl` (jpa.paged_decode/... or the reference) on the case; numpy (out, lse).
    `pages(case, put)`, when given, makes the page operands instead (scripts/gpu_fuzz.py
    grows the pool on the device)."""
    inp, cfg = case.inputs, case.config
    k, v = (pages or _page_operands)(case, put)
    args = [_q_operand(case, jpa, put), k, v] + [put(a) for a in inp.args[3:]]
    kw = {key: put(val) for key, val in inp.kwargs.items()}
    kw["return_lse"] = True
    if float32_oracle:
        kw["out_dtype"] = np.float32
    if cfg.num_layers:
        kw["layer"] = put(np.int32(case.layer)) if cfg.traced_layer else case.layer
    out, lse = impl(*args, **kw)
    return np.asarray(out), np.asarray(lse)


def expected_invalid_rows(case: Case) -> np.ndarray:
    """[T] bool from the plain-Python oracle (semantics rules 1-3, plus a missing layer)."""
    inp, cfg = case.inputs, case.config
    c = cfg.case
    T = cfg.num_tokens
    bad = cases.invalid_requests(
        inp.block_tables, inp.seq_lens, num_pages=cfg.num_pages, page_size=c.page_size,
        num_tokens=T, cu_seqlens_q=inp.cu_seqlens_q, q_len_per_req=c.q_len_per_req,
        max_q_len=cfg.max_q_len if c.kind == "prefill" else None, window_left=c.window_left)
    if cfg.num_layers and not 0 <= case.layer < cfg.num_layers:
        bad = set(range(c.batch))
    ranges = cases.row_ranges(T, c.batch, inp.cu_seqlens_q, c.q_len_per_req)
    rows = np.zeros(T, bool)
    for b in bad:
        rows[ranges[b][0]:ranges[b][1]] = True
    return rows


def padding_rows(case: Case) -> np.ndarray:
    c = case.config.case
    ranges = cases.row_ranges(case.config.num_tokens, c.batch, case.inputs.cu_seqlens_q,
                              c.q_len_per_req)
    rows = np.ones(case.config.num_tokens, bool)
    for lo, hi in ranges:
        rows[lo:hi] = False
    return rows


def check(case: Case, out, lse, ref_out, ref_lse, assert_close, tols=None):
    """Raises AssertionError (naming the case) unless `out`/`lse` follow the contract.
    `tols` = (out, lse) bounds; by default the output dtype's and `cases.LSE_TOLERANCE`
    (the CPU path computes in float32 from the same rounded inputs as the reference)."""
    try:
        c = case.config.case
        bad = expected_invalid_rows(case)
        pad = padding_rows(case)
        assert out.dtype == cases.DTYPES[c.out_dtype_name], (out.dtype, c.out_dtype_name)
        o32 = out.astype(np.float32)
        # NaN exactly in the rows of invalid requests: in ours and in the reference.
        got_nan = np.isnan(o32).all(axis=(1, 2))
        assert np.array_equal(got_nan, bad), (
            f"NaN rows {np.flatnonzero(got_nan).tolist()} != invalid rows "
            f"{np.flatnonzero(bad).tolist()} (broken: {case.broken})")
        assert np.array_equal(np.isnan(ref_out).all(axis=(1, 2)), bad), "reference NaN rows"
        assert np.isnan(lse[bad]).all()
        good = ~bad
        assert not np.isnan(o32[good]).any(), "NaN outside invalid rows"
        assert not np.isnan(lse[good]).any(), "NaN lse outside invalid rows"
        assert np.all(o32[pad & good] == 0) and np.all(lse[pad & good] == -np.inf), "padding"
        if good.any():
            out_tol, lse_tol = tols or (None, cases.LSE_TOLERANCE)
            assert_close(out[good], ref_out[good], out_tol, what="out")
            assert_close(lse[good], ref_lse[good], lse_tol, what="lse")
    except AssertionError as e:
        raise AssertionError(f"{case.repro()} [{case.config.case.id()}, q_view="
                             f"{case.config.q_view}, layers={case.config.num_layers}"
                             f"{'/traced' if case.config.traced_layer else ''}, broken="
                             f"{case.broken}]: {e}") from None
