"""Test-case generation shared by the CPU suite, the GPU suite, the scripts and the benchmarks.

Everything here is plain Python + numpy: a case is a frozen ``AttnCase`` (one point of the
option grid), ``make_inputs(case)`` turns it into random numpy operands (fresh values drawn
from a ``numpy.random.Generator`` seeded by ``case.seed``; never zeros), and ``run`` /
``run_reference`` put those operands on a device and call an implementation. A GPU suite
reuses the same grid with ``run(..., device=gpu)`` and, where it must, a
``dataclasses.replace(case, head_dim=128)``.

This module is the one home of runtime metadata: request lengths (``grid_lengths`` for the
small grid, ``long_lengths`` for large shapes, ``uniform_seq_lens``), the rows they own
(``cu_seqlens``, ``token_rows``), block tables (``build_block_tables``: distinct pages in a
random order, garbage in never-needed entries; ``pool_block_tables``: the benchmarks' exact
pool), the keyword options of a case (``case_kwargs``) and the assembly of an ``Inputs``
(``make_metadata``, ``assemble_inputs``). Values drawn on a device with ``jax.random`` (sizes
where numpy would be slow) live in the sibling ``device_inputs.py``, which builds on these;
this file stays importable without jax.

``invalid_requests`` / ``row_ranges`` restate docs/semantics.md ("Rows and requests",
"Invalid runtime metadata") in plain Python, as an oracle independent of the reference.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import ml_dtypes
import numpy as np

DTYPES = {
    "f32": np.dtype(np.float32),
    "f16": np.dtype(np.float16),
    "bf16": np.dtype(ml_dtypes.bfloat16),
    "fp8": np.dtype(ml_dtypes.float8_e4m3fn),
}

# Relative L2 error allowed against the float32 reference, keyed by the output dtype.
TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "bf16": 1e-2}
LSE_TOLERANCE = 1e-5

# Unused block-table entries get values like these: they must never be read.
GARBAGE_PAGES = (-1, -7, 2**31 - 1, -(2**31))


def dtype_name(dt) -> str:
    dt = np.dtype(dt)
    for k, v in DTYPES.items():
        if v == dt:
            return k
    raise KeyError(dt)


def tolerance(dt) -> float:
    return TOLERANCE[dtype_name(dt)]


# On the GPU the kernels multiply in the input dtype (P is rounded to it before P.V), so the
# loosest dtype of the chain q -> pages -> out sets the bound, not the output dtype alone:
# bf16 anywhere -> 1e-2, else (f16; fp8 pages widen exactly to f16) 2e-3. The lse is float32
# but summed in another order with exp2/log2; an f16 q over bf16 pages is rounded to bf16.
GPU_LSE_TOLERANCE = 2e-5


def gpu_tolerances(q_dtype, kv_dtype, out_dtype=None) -> tuple[float, float]:
    """(out, lse) relative-L2 bounds for a CUDA kernel against the float32 reference."""
    names = {q_dtype, kv_dtype, out_dtype or q_dtype}
    out_tol = 1e-2 if "bf16" in names else 2e-3
    lse_tol = 2e-3 if (q_dtype, kv_dtype) == ("f16", "bf16") else GPU_LSE_TOLERANCE
    return out_tol, lse_tol


@dataclasses.dataclass(frozen=True)
class AttnCase:
    """One point of the attention option grid (decode or prefill)."""

    kind: str = "decode"  # "decode" | "prefill"
    batch: int = 3
    num_kv_heads: int = 2
    group: int = 2  # num_q_heads // num_kv_heads
    head_dim: int = 16
    page_size: int = 4
    q_dtype: str = "f32"
    kv_dtype: str = "f32"
    kv_layout: str = "NHD"
    combined: bool = False
    window_left: int = -1
    logits_soft_cap: float | None = None
    sinks: bool = False
    return_lse: bool = True
    scale: float | None = None
    k_scale: float | None = None
    v_scale: float | None = None
    out_dtype: str | None = None
    max_kv_len: int = 37
    # decode
    q_len_per_req: int = 1
    # prefill
    causal: bool = True
    max_q_len: int = 6  # largest q length drawn
    max_q_len_slack: int = 0  # static max_q_len passed = largest drawn + slack
    zero_q_lens: bool = False  # include q_len 0 requests (one with kv_len 0 too when batch >= 4)
    pad_front: int = 0  # padding rows before cu_seqlens_q[0]
    pad_back: int = 0  # padding rows after cu_seqlens_q[B]
    # block tables
    garbage_tables: bool = True  # never-needed table entries hold out-of-range page indices
    extra_pages: int = 3
    seed: int = 0

    @property
    def num_q_heads(self) -> int:
        return self.num_kv_heads * self.group

    @property
    def out_dtype_name(self) -> str:
        return self.out_dtype or self.q_dtype

    def id(self) -> str:
        d = AttnCase()
        parts = [self.kind[:3]]
        for f in dataclasses.fields(self):
            if f.name in ("kind",):
                continue
            v = getattr(self, f.name)
            if v != getattr(d, f.name):
                parts.append(f"{f.name}={v}")
        return "-".join(str(p) for p in parts)


@dataclasses.dataclass
class Inputs:
    """Numpy operands of one case, ready for ``run``."""

    case: AttnCase
    args: tuple  # positional operands (numpy); v_pages may be None
    kwargs: dict  # keyword options (sinks as a numpy array)
    q_lens: np.ndarray  # [B] q length of each request
    kv_lens: np.ndarray  # [B]
    row_owner: np.ndarray  # [T] request owning each row, -1 for padding
    num_pages: int
    page_size: int
    k_logical: np.ndarray  # [P, page, Hkv, D] stored K (before k_scale), page dtype
    v_logical: np.ndarray

    @property
    def q(self):
        return self.args[0]

    @property
    def num_tokens(self) -> int:
        return self.args[0].shape[0]

    @property
    def block_tables(self):
        return self.args[3]

    @property
    def seq_lens(self):
        return self.args[4]

    @property
    def cu_seqlens_q(self):
        return self.args[5] if self.case.kind == "prefill" else None

    def with_args(self, **changes) -> "Inputs":
        """A copy with some positional operands replaced by name."""
        names = ["q", "k_pages", "v_pages", "block_tables", "seq_lens", "cu_seqlens_q"]
        args = list(self.args)
        for k, v in changes.items():
            args[names.index(k)] = v
        return dataclasses.replace(self, args=tuple(args))


def _rand(rng: np.random.Generator, shape, dtype, std=1.0, mean=0.0) -> np.ndarray:
    x = rng.standard_normal(shape, dtype=np.float32) * np.float32(std) + np.float32(mean)
    # never an exact zero: nudge the (rare) zeros away
    x = np.where(x == 0, np.float32(0.125), x)
    return x.astype(dtype)


def to_layout(pages_nhd: np.ndarray, kv_layout: str) -> np.ndarray:
    """[P, page, H, D] -> the physical layout of ``kv_layout``."""
    if kv_layout == "NHD":
        return np.ascontiguousarray(pages_nhd)
    if kv_layout == "HND":
        return np.ascontiguousarray(pages_nhd.transpose(0, 2, 1, 3))
    raise ValueError(kv_layout)


def from_layout(pages: np.ndarray, kv_layout: str) -> np.ndarray:
    """Inverse of ``to_layout``."""
    return to_layout(pages, kv_layout)  # the transpose is its own inverse


def make_pages(rng, num_pages, page_size, num_kv_heads, head_dim, kv_dtype):
    """Random stored K and V pages in NHD order, dtype ``kv_dtype``."""
    dt = DTYPES[kv_dtype]
    std = 1.5 if kv_dtype == "fp8" else 1.0
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    return _rand(rng, shape, dt, std), _rand(rng, shape, dt, std)


def pack_pages(k_nhd, v_nhd, kv_layout, combined):
    """(k_pages, v_pages) operands in the requested layout; v_pages None when combined."""
    k = to_layout(k_nhd, kv_layout)
    v = to_layout(v_nhd, kv_layout)
    if combined:
        return np.ascontiguousarray(np.stack([k, v], axis=1)), None
    return k, v


def first_needed_key(kv_len, q_len, window_left):
    if window_left < 0:
        return 0
    return max(0, kv_len - q_len - window_left)


def build_block_tables(rng, kv_lens, q_lens, page_size, window_left, garbage, extra_pages,
                       extra_cols=1):
    """Block tables giving each request distinct pages in a random physical order.

    Entries that are never needed (past the last page of a request, before the first key a
    window can reach, or every entry of a q_len-0 request) hold out-of-range garbage when
    ``garbage``; otherwise random valid indices.
    """
    kv_lens = np.asarray(kv_lens)
    B = len(kv_lens)
    npg = [-(-int(L) // page_size) for L in kv_lens]
    max_pages = max(max(npg) + extra_cols, 1)
    num_pages = sum(npg) + extra_pages
    perm = rng.permutation(num_pages)
    bt = np.empty((B, max_pages), np.int64)
    nxt = 0
    for b in range(B):
        L, n = int(kv_lens[b]), int(q_lens[b])
        lo_page = first_needed_key(L, n, window_left) // page_size
        for i in range(max_pages):
            needed = n > 0 and i < npg[b] and i >= lo_page
            if i < npg[b]:
                page = int(perm[nxt])
                nxt += 1
            else:
                page = int(rng.integers(0, num_pages))
            if garbage and not needed:
                page = int(rng.choice(GARBAGE_PAGES + (num_pages, num_pages + 3)))
            bt[b, i] = page
    return bt.astype(np.int32), num_pages


def pool_block_tables(rng, batch, capacity, page_size):
    """(block tables, num_pages) of an exactly sized pool: each request owns
    ceil(capacity / page_size) distinct pages, the pool is batch x that many pages (what
    cuDNN's paged attention requires), in a random physical order; every entry valid."""
    full = np.full(batch, capacity, np.int64)
    return build_block_tables(rng, full, np.ones(batch, np.int64), page_size, -1,
                              garbage=False, extra_pages=0, extra_cols=0)


def uniform_seq_lens(seed: int, batch: int, lo: int, hi: int) -> np.ndarray:
    """Uniform integer lengths in [lo, hi] (int32), reproducible in ``seed``."""
    return np.random.default_rng(seed).integers(lo, hi + 1, size=batch).astype(np.int32)


def cu_seqlens(q_lens, pad_front=0) -> np.ndarray:
    """[B + 1] int64 row offsets of requests with these q lengths, after pad_front rows."""
    return np.concatenate([[0], np.cumsum(np.asarray(q_lens, np.int64))]) + pad_front


def token_rows(kind, q_lens, pad_front=0, pad_back=0):
    """(cu_seqlens_q or None, num_tokens, row_owner): the rows of each request. Decode: the
    requests' q_len_per_req rows back to back (every q_lens entry equal); prefill: rows
    cu[b]:cu[b+1] after pad_front padding rows, pad_back padding rows at the end."""
    q_lens = np.asarray(q_lens, np.int64)
    B = len(q_lens)
    if kind == "decode":
        n = int(q_lens[0]) if B else 1
        return None, B * n, np.repeat(np.arange(B), n)
    if kind != "prefill":
        raise ValueError(kind)
    cu = cu_seqlens(q_lens, pad_front)
    T = int(cu[-1]) + pad_back
    row_owner = np.full(T, -1, np.int64)
    for b in range(B):
        row_owner[cu[b]:cu[b + 1]] = b
    return cu, T, row_owner


def grid_lengths(rng, case: AttnCase):
    """(q_lens, kv_lens) [B] int64 of the small grid: decode kv_lens in [n, max_kv_len]
    with the shortest possible request first and one ending on a page boundary; prefill
    q_lens in [1, max_q_len] over some context, the first request all new tokens, q_len 0
    requests with ``zero_q_lens``."""
    B, ps = case.batch, case.page_size
    if case.kind == "decode":
        n = case.q_len_per_req
        q_lens = np.full(B, n, np.int64)
        kv_lens = rng.integers(n, max(case.max_kv_len, n) + 1, size=B)
        kv_lens[0] = n  # shortest possible request
        if B >= 3 and (int(kv_lens[2]) // ps) * ps >= n:  # one request ending on a page boundary
            kv_lens[2] = (int(kv_lens[2]) // ps) * ps
        return q_lens, kv_lens
    if case.kind != "prefill":
        raise ValueError(case.kind)
    q_lens = rng.integers(1, case.max_q_len + 1, size=B)
    ctx = rng.integers(0, max(case.max_kv_len - case.max_q_len, 0) + 1, size=B)
    ctx[0] = 0  # kv_len == q_len: the whole request is new tokens
    if case.zero_q_lens:
        q_lens[min(1, B - 1)] = 0  # q_len 0 with some context
        if B >= 4:
            q_lens[3] = 0
            ctx[3] = 0  # q_len 0 and kv_len 0
    return q_lens, q_lens + ctx


def long_lengths(rng, case: AttnCase, q_lens=None, min_kv=None):
    """(q_lens, kv_lens) [B] int64 of large shapes, the longest request first. Decode:
    kv_lens in [max(n, min_kv), max_kv_len], request 0 exactly max_kv_len. Prefill: the
    given ``q_lens`` over a context in [0, max_kv_len - max(q_lens)], request 0 reaching
    max_kv_len."""
    B, L = case.batch, case.max_kv_len
    if case.kind == "decode":
        n = case.q_len_per_req
        kv_lens = rng.integers(max(n, min_kv or n), L + 1, size=B)
        kv_lens[0] = L
        return np.full(B, n, np.int64), kv_lens
    ql = np.asarray(q_lens, np.int64)
    ctx = rng.integers(0, max(L - int(ql.max()), 0) + 1, size=B)
    ctx[0] = max(0, L - int(ql[0]))
    return ql, ql + ctx


@dataclasses.dataclass
class Metadata:
    """Lengths, rows and block tables of one batch of requests (numpy)."""

    q_lens: np.ndarray  # [B] int64
    kv_lens: np.ndarray  # [B] int64
    cu_seqlens_q: np.ndarray | None  # [B + 1] int64, prefill only
    num_tokens: int
    row_owner: np.ndarray  # [T] request owning each row, -1 for padding
    block_tables: np.ndarray  # [B, M] int32
    num_pages: int


def make_metadata(rng, case: AttnCase, q_lens, kv_lens, extra_cols=1) -> Metadata:
    """The rows and block tables of ``case`` for these lengths (tables as
    ``build_block_tables`` with the case's window, garbage and extra pages)."""
    cu, T, row_owner = token_rows(case.kind, q_lens, case.pad_front, case.pad_back)
    bt, num_pages = build_block_tables(rng, kv_lens, q_lens, case.page_size, case.window_left,
                                       case.garbage_tables, case.extra_pages, extra_cols)
    return Metadata(q_lens=q_lens, kv_lens=kv_lens, cu_seqlens_q=cu, num_tokens=T,
                    row_owner=row_owner, block_tables=bt, num_pages=num_pages)


def _page_kwargs(case) -> dict[str, Any]:
    """kv_layout / k_scale / v_scale of an AttnCase or AppendCase (defaults left out)."""
    kw: dict[str, Any] = {}
    if case.kv_layout != "NHD":
        kw["kv_layout"] = case.kv_layout
    if case.k_scale is not None:
        kw["k_scale"] = case.k_scale
    if case.v_scale is not None:
        kw["v_scale"] = case.v_scale
    return kw


def case_kwargs(case: AttnCase, q_lens, rng) -> dict[str, Any]:
    """The keyword options of ``case`` (sinks drawn from ``rng`` as a numpy array)."""
    kw = _page_kwargs(case)
    if case.scale is not None:
        kw["scale"] = case.scale
    if case.window_left != -1:
        kw["window_left"] = case.window_left
    if case.logits_soft_cap is not None:
        kw["logits_soft_cap"] = case.logits_soft_cap
    if case.sinks:
        kw["sinks"] = _rand(rng, (case.num_q_heads,), np.float32, std=1.0, mean=0.5)
    if case.return_lse:
        kw["return_lse"] = True
    if case.out_dtype is not None:
        kw["out_dtype"] = DTYPES[case.out_dtype]
    if case.kind == "decode":
        if case.q_len_per_req != 1:
            kw["q_len_per_req"] = case.q_len_per_req
    else:
        kw["max_q_len"] = int(max(int(np.max(q_lens)), 1) + case.max_q_len_slack)
        if not case.causal:
            kw["causal"] = False
    return kw


def assemble_inputs(case: AttnCase, rng, meta: Metadata, q, k_pages, v_pages,
                    k_logical=None, v_logical=None) -> Inputs:
    """``Inputs`` from metadata and values (numpy or device arrays); draws the sinks."""
    args = [q, k_pages, v_pages, meta.block_tables, meta.kv_lens.astype(np.int32)]
    if meta.cu_seqlens_q is not None:
        args.append(meta.cu_seqlens_q.astype(np.int32))
    return Inputs(case=case, args=tuple(args), kwargs=case_kwargs(case, meta.q_lens, rng),
                  q_lens=meta.q_lens, kv_lens=meta.kv_lens, row_owner=meta.row_owner,
                  num_pages=meta.num_pages, page_size=case.page_size,
                  k_logical=k_logical, v_logical=v_logical)


def make_inputs(case: AttnCase) -> Inputs:
    """Random operands for ``case`` (numpy; deterministic in ``case.seed``)."""
    rng = np.random.default_rng(case.seed)
    q_lens, kv_lens = grid_lengths(rng, case)
    meta = make_metadata(rng, case, q_lens, kv_lens)
    k_nhd, v_nhd = make_pages(rng, meta.num_pages, case.page_size, case.num_kv_heads,
                              case.head_dim, case.kv_dtype)
    k_pages, v_pages = pack_pages(k_nhd, v_nhd, case.kv_layout, case.combined)
    q = _rand(rng, (meta.num_tokens, case.num_q_heads, case.head_dim), DTYPES[case.q_dtype])
    return assemble_inputs(case, rng, meta, q, k_pages, v_pages, k_nhd, v_nhd)


# ----------------------------------------------------------------------------- running


def put(x, device=None):
    """numpy -> jax array on ``device`` (default device when None); other values unchanged."""
    import jax

    if isinstance(x, np.ndarray):
        return jax.device_put(x, device) if device is not None else jax.numpy.asarray(x)
    return x


def run(fn: Callable, inputs: Inputs, device=None, args=None, **overrides):
    """Call ``fn(*args, **kwargs)`` with the case's operands placed on ``device``.

    ``fn`` is e.g. ``jax_paged_attn.paged_decode`` or ``jax_paged_attn.reference.paged_decode``.
    Returns ``(out, lse)`` (lse None without return_lse) as numpy arrays.
    """
    a = [put(x, device) for x in (inputs.args if args is None else args)]
    kw = {k: put(v, device) for k, v in {**inputs.kwargs, **overrides}.items()}
    res = fn(*a, **kw)
    if kw.get("return_lse", False):
        out, lse = res
        return np.asarray(out), np.asarray(lse)
    return np.asarray(res), None


def run_reference(ref_fn: Callable, inputs: Inputs, **overrides):
    """The float32 oracle: the reference with ``out_dtype=float32`` and return_lse=True."""
    ov = {"out_dtype": np.float32, "return_lse": True, **overrides}
    return run(ref_fn, inputs, **ov)


# ----------------------------------------------------------------------------- semantics


def row_ranges(num_tokens, batch, cu_seqlens_q=None, q_len_per_req=1):
    """[(begin, end)] rows owned by each request (docs/semantics.md, Rows and requests)."""
    if cu_seqlens_q is None:
        n = q_len_per_req
        return [(b * n, (b + 1) * n) for b in range(batch)]
    cu = np.asarray(cu_seqlens_q, np.int64)
    e = np.clip(np.maximum.accumulate(cu), 0, num_tokens)
    return [(int(e[b]), int(e[b + 1])) for b in range(batch)]


def invalid_requests(block_tables, seq_lens, *, num_pages, page_size, num_tokens,
                     cu_seqlens_q=None, q_len_per_req=1, max_q_len=None, window_left=-1):
    """Set of request indices whose metadata is invalid (rules 1-3 of the semantics)."""
    bt = np.asarray(block_tables, np.int64)
    sl = np.asarray(seq_lens, np.int64)
    B, M = bt.shape
    ranges = row_ranges(num_tokens, B, cu_seqlens_q, q_len_per_req)
    bad = set()
    for b in range(B):
        q_len = ranges[b][1] - ranges[b][0]
        ok = True
        if cu_seqlens_q is not None:
            cu = np.asarray(cu_seqlens_q, np.int64)
            ok = (cu[b] >= 0 and cu[b + 1] >= cu[b] and cu[b] >= cu[: b + 1].max()
                  and cu[b + 1] <= num_tokens and (max_q_len is None or q_len <= max_q_len))
        L = int(sl[b])
        ok = ok and L >= 0 and L >= q_len and L <= M * page_size
        if ok and q_len > 0:
            lo = first_needed_key(L, q_len, window_left)
            if L > lo:
                for p in range(lo // page_size, (L - 1) // page_size + 1):
                    if not 0 <= bt[b, p] < num_pages:
                        ok = False
        if not ok:
            bad.add(b)
    return bad


def invalid_rows(inputs: Inputs, bad) -> np.ndarray:
    """Boolean mask [T] of rows owned by the requests in ``bad``."""
    c = inputs.case
    ranges = row_ranges(inputs.num_tokens, c.batch, inputs.cu_seqlens_q, c.q_len_per_req)
    mask = np.zeros(inputs.num_tokens, bool)
    for b in bad:
        mask[ranges[b][0]:ranges[b][1]] = True
    return mask


def padding_rows(inputs: Inputs) -> np.ndarray:
    """Boolean mask [T] of rows owned by no request."""
    c = inputs.case
    ranges = row_ranges(inputs.num_tokens, c.batch, inputs.cu_seqlens_q, c.q_len_per_req)
    mask = np.ones(inputs.num_tokens, bool)
    for lo, hi in ranges:
        mask[lo:hi] = False
    return mask


# ----------------------------------------------------------------------------- the grid


def _decode_grid():
    D = AttnCase
    g = []
    # q dtype x page dtype (fp8 pages with scales)
    for qd in ("f32", "bf16", "f16"):
        for kd in ("f32", "bf16", "f16", "fp8"):
            sc = dict(k_scale=0.45, v_scale=1.3) if kd == "fp8" else {}
            g.append(D(q_dtype=qd, kv_dtype=kd, **sc))
    # page sizes: 1, non powers of two, larger than every sequence
    for ps in (1, 3, 5, 16, 64):
        g.append(D(page_size=ps, kv_dtype="bf16", q_dtype="bf16"))
    # GQA groups in both layouts
    for grp, hkv in ((1, 3), (2, 2), (5, 2), (8, 1)):
        for lay in ("NHD", "HND"):
            g.append(D(group=grp, num_kv_heads=hkv, kv_layout=lay))
    # layouts, separate and combined
    for lay in ("NHD", "HND"):
        for comb in (False, True):
            for kd, sc in (("bf16", {}), ("fp8", dict(k_scale=0.7, v_scale=0.35))):
                g.append(D(kv_layout=lay, combined=comb, kv_dtype=kd, q_dtype="bf16", page_size=5, **sc))
    # sliding window (unneeded early pages hold garbage)
    for w in (0, 1, 6, 200):
        for n in (1, 3):
            g.append(D(window_left=w, q_len_per_req=n, page_size=3))
    # soft cap
    for cap in (0.5, 2.0, 30.0):
        g.append(D(logits_soft_cap=cap))
    # attention sinks
    g.append(D(sinks=True))
    g.append(D(sinks=True, return_lse=False))
    g.append(D(sinks=True, window_left=2, q_len_per_req=2))
    g.append(D(sinks=True, logits_soft_cap=1.5, kv_dtype="bf16", q_dtype="bf16"))
    # several query tokens per request (speculative decoding)
    for n, ps in ((2, 1), (3, 5), (4, 4), (7, 16)):
        g.append(D(q_len_per_req=n, page_size=ps))
    # output dtype
    for qd, od in (("bf16", "f32"), ("f32", "bf16"), ("bf16", "f16"), ("f16", "f32")):
        g.append(D(q_dtype=qd, out_dtype=od, kv_dtype="bf16"))
    # explicit softmax scale, scales on non-fp8 pages, no lse
    g.append(D(scale=0.07))
    g.append(D(scale=0.6, kv_dtype="f16", q_dtype="f16"))
    g.append(D(k_scale=0.5, v_scale=2.5, kv_dtype="bf16", q_dtype="bf16"))
    g.append(D(k_scale=1.7, kv_dtype="f32"))
    g.append(D(return_lse=False, kv_dtype="f16", q_dtype="bf16"))
    # a larger batch, a single request, valid filler instead of garbage in unused entries
    g.append(D(batch=7, max_kv_len=20))
    g.append(D(batch=1, max_kv_len=60, page_size=8))
    g.append(D(garbage_tables=False, window_left=4))
    g.append(D(head_dim=8))
    g.append(D(head_dim=64, kv_dtype="bf16", q_dtype="bf16"))
    g.extend(_random_combos("decode", 20, seed=1001))
    return [dataclasses.replace(c, seed=i) for i, c in enumerate(g)]


def _prefill_grid():
    P = lambda **kw: AttnCase(kind="prefill", **kw)  # noqa: E731
    g = []
    for causal in (True, False):
        for lay in ("NHD", "HND"):
            g.append(P(causal=causal, kv_layout=lay))
    for qd, kd in (("f32", "f32"), ("bf16", "bf16"), ("f16", "f16"), ("bf16", "fp8"),
                   ("f16", "fp8"), ("f32", "fp8"), ("bf16", "f32"), ("f32", "f16")):
        sc = dict(k_scale=0.55, v_scale=1.2) if kd == "fp8" else {}
        g.append(P(q_dtype=qd, kv_dtype=kd, **sc))
    for ps in (1, 5, 16):
        g.append(P(page_size=ps))
    for grp, hkv in ((1, 2), (2, 2), (5, 1), (8, 1)):
        g.append(P(group=grp, num_kv_heads=hkv, kv_layout="HND" if grp % 2 else "NHD"))
    for causal in (True, False):
        g.append(P(zero_q_lens=True, batch=5, causal=causal))
    g.append(P(pad_front=3))
    g.append(P(pad_back=4))
    g.append(P(pad_front=2, pad_back=2, zero_q_lens=True, batch=4, sinks=True))
    for w in (0, 3, 50):
        for causal in (True, False):
            g.append(P(window_left=w, causal=causal, page_size=3))
    g.append(P(sinks=True))
    g.append(P(sinks=True, causal=False, window_left=2))
    for cap in (0.8, 10.0):
        g.append(P(logits_soft_cap=cap))
    g.append(P(return_lse=False))
    for lay in ("NHD", "HND"):
        g.append(P(kv_layout=lay, combined=True, kv_dtype="bf16", q_dtype="bf16", page_size=5))
    g.append(P(combined=True, kv_dtype="fp8", k_scale=0.3, v_scale=0.9, kv_layout="HND"))
    g.append(P(max_q_len_slack=5))
    g.append(P(max_q_len=1, max_kv_len=12))  # every request a single token
    g.append(P(max_q_len=12, max_kv_len=30, batch=2))
    g.append(P(out_dtype="f32", q_dtype="bf16", kv_dtype="bf16"))
    g.append(P(scale=0.11, k_scale=0.5, v_scale=2.0))
    g.extend(_random_combos("prefill", 16, seed=2002))
    return [dataclasses.replace(c, seed=500 + i) for i, c in enumerate(g)]


def _random_combos(kind, count, seed):
    """Random combinations of every axis (deterministic), to catch interactions."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        grp, hkv = [(1, 2), (2, 2), (5, 1), (8, 1), (3, 2), (4, 1)][rng.integers(6)]
        kd = ["f32", "bf16", "f16", "fp8"][rng.integers(4)]
        qd = ["f32", "bf16", "f16"][rng.integers(3)]
        kw = dict(
            kind=kind, group=grp, num_kv_heads=hkv, kv_dtype=kd, q_dtype=qd,
            page_size=int([1, 2, 5, 7, 16][rng.integers(5)]),
            kv_layout=["NHD", "HND"][rng.integers(2)], combined=bool(rng.integers(2)),
            window_left=int([-1, -1, 0, 2, 9][rng.integers(5)]),
            logits_soft_cap=[None, None, 1.0, 4.0][rng.integers(4)],
            sinks=bool(rng.integers(2)), return_lse=bool(rng.integers(3) > 0),
            head_dim=int([8, 16, 32][rng.integers(3)]),
            out_dtype=[None, None, "f32", "bf16"][rng.integers(4)],
            batch=int(rng.integers(1, 6)),
        )
        if kd == "fp8" or rng.integers(3) == 0:
            kw["k_scale"] = float(np.round(rng.uniform(0.2, 2.0), 3))
            kw["v_scale"] = float(np.round(rng.uniform(0.2, 2.0), 3))
        if kind == "decode":
            kw["q_len_per_req"] = int([1, 1, 2, 3][rng.integers(4)])
        else:
            kw["causal"] = bool(rng.integers(3) > 0)
            kw["zero_q_lens"] = bool(rng.integers(2))
            kw["pad_back"] = int(rng.integers(0, 3))
            kw["pad_front"] = int(rng.integers(0, 2))
            kw["max_q_len_slack"] = int(rng.integers(0, 3))
        out.append(AttnCase(**kw))
    return out


DECODE_GRID = _decode_grid()
PREFILL_GRID = _prefill_grid()


# ----------------------------------------------------------------------------- append


@dataclasses.dataclass(frozen=True)
class AppendCase:
    num_tokens: int = 9
    num_kv_heads: int = 2
    head_dim: int = 16
    page_size: int = 4
    num_pages: int = 6
    new_dtype: str = "f32"  # dtype of k, v
    kv_dtype: str = "f32"
    kv_layout: str = "NHD"
    combined: bool = False
    k_scale: float | None = None
    v_scale: float | None = None
    skip_fraction: float = 0.0  # fraction of tokens with a negative / out-of-range slot
    seed: int = 0

    def id(self) -> str:
        d = AppendCase()
        return "-".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                        if getattr(self, f.name) != getattr(d, f.name)) or "default"


def make_append_inputs(case: AppendCase):
    """(k_pages, v_pages, k, v, slot_mapping), kwargs -- distinct slots, some skipped."""
    rng = np.random.default_rng(case.seed)
    P, ps, H, D, T = case.num_pages, case.page_size, case.num_kv_heads, case.head_dim, case.num_tokens
    k_nhd, v_nhd = make_pages(rng, P, ps, H, D, case.kv_dtype)
    k_pages, v_pages = pack_pages(k_nhd, v_nhd, case.kv_layout, case.combined)
    std = 3.0 if case.kv_dtype == "fp8" else 1.0
    k = _rand(rng, (T, H, D), DTYPES[case.new_dtype], std)
    v = _rand(rng, (T, H, D), DTYPES[case.new_dtype], std)
    assert T <= P * ps
    slots = rng.permutation(P * ps)[:T].astype(np.int64)
    skip = rng.random(T) < case.skip_fraction
    bad = np.array([-1, -5, P * ps, P * ps + 11, -(2**31), 2**31 - 1], np.int64)
    slots = np.where(skip, bad[rng.integers(0, len(bad), T)], slots)
    return (k_pages, v_pages, k, v, slots.astype(np.int32)), _page_kwargs(case)


def expected_append(case: AppendCase, k_pages, v_pages, k, v, slots):
    """Plain-numpy append (the semantics; ml_dtypes casts round to nearest even)."""
    dt = DTYPES[case.kv_dtype]
    if case.combined:
        kk = from_layout(k_pages[:, 0], case.kv_layout).copy()
        vv = from_layout(k_pages[:, 1], case.kv_layout).copy()
    else:
        kk = from_layout(k_pages, case.kv_layout).copy()
        vv = from_layout(v_pages, case.kv_layout).copy()
    ks = np.float32(1.0 if case.k_scale is None else case.k_scale)
    vs = np.float32(1.0 if case.v_scale is None else case.v_scale)
    P, ps = case.num_pages, case.page_size
    for t, s in enumerate(np.asarray(slots, np.int64)):
        if s < 0 or s >= P * ps:
            continue
        kx = k[t].astype(np.float32) / ks
        vx = v[t].astype(np.float32) / vs
        if case.kv_dtype == "fp8":
            kx, vx = np.clip(kx, -448, 448), np.clip(vx, -448, 448)
        kk[s // ps, s % ps] = kx.astype(dt)
        vv[s // ps, s % ps] = vx.astype(dt)
    return pack_pages(kk, vv, case.kv_layout, case.combined)
