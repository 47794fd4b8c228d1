"""The pure-jnp reference checked against an independent dense oracle.

The oracle below is plain Python/NumPy in float64, written from docs/semantics.md alone: it
loops over requests, rows, heads and keys, looks every key up through the block table, and
decides validity rule by rule. It shares no code with jax_paged_attn/reference.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_paged_attn import reference as ref
from jax_paged_attn import views

FP8 = ml_dtypes.float8_e4m3fn
BF16 = ml_dtypes.bfloat16
RTOL = 1e-5


# --------------------------------------------------------------------------------------------
# Independent oracle
# --------------------------------------------------------------------------------------------

def _key_value(k_pages, v_pages, layout, page, slot, head):
    """K and V (float64 [D]) stored at (page, slot, kv head); v_pages None = combined."""
    if v_pages is None:
        if layout == "NHD":
            return k_pages[page, 0, slot, head], k_pages[page, 1, slot, head]
        return k_pages[page, 0, head, slot], k_pages[page, 1, head, slot]
    if layout == "NHD":
        return k_pages[page, slot, head], v_pages[page, slot, head]
    return k_pages[page, head, slot], v_pages[page, head, slot]


def oracle(q, k_pages, v_pages, block_tables, seq_lens, cu_seqlens_q=None, *, max_q_len=None,
           q_len_per_req=1, causal=True, layout="NHD", scale=None, k_scale=1.0, v_scale=1.0,
           window_left=-1, soft_cap=None, sinks=None):
    """(out, lse) float64 by the letter of docs/semantics.md."""
    q = np.asarray(q).astype(np.float64)
    k_pages = np.asarray(k_pages).astype(np.float64)
    v_pages = None if v_pages is None else np.asarray(v_pages).astype(np.float64)
    bt = np.asarray(block_tables)
    sl = np.asarray(seq_lens)
    T, Hq, D = q.shape
    B, M = bt.shape
    P = k_pages.shape[0]
    if v_pages is None:
        ps = k_pages.shape[2] if layout == "NHD" else k_pages.shape[3]
        Hkv = k_pages.shape[3] if layout == "NHD" else k_pages.shape[2]
    else:
        ps = k_pages.shape[1] if layout == "NHD" else k_pages.shape[2]
        Hkv = k_pages.shape[2] if layout == "NHD" else k_pages.shape[1]
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale

    # Rows of each request, and rule 1.
    begins, qlens, rule1_bad = [], [], []
    if cu_seqlens_q is None:
        for b in range(B):
            begins.append(b * q_len_per_req)
            qlens.append(q_len_per_req)
            rule1_bad.append(False)
    else:
        cu = [int(c) for c in np.asarray(cu_seqlens_q)]
        e = [min(max(max(cu[:i + 1]), 0), T) for i in range(B + 1)]
        for b in range(B):
            begins.append(e[b])
            qlens.append(e[b + 1] - e[b])
            rule1_bad.append(cu[b] < 0 or cu[b + 1] < cu[b] or cu[b] < max(cu[:b + 1])
                             or cu[b + 1] > T or e[b + 1] - e[b] > max_q_len)

    out = np.zeros((T, Hq, D))
    lse = np.full((T, Hq), -np.inf)
    for b in range(B):
        L, n, t0 = int(sl[b]), qlens[b], begins[b]
        bad = rule1_bad[b] or L < 0 or L < n or L > M * ps
        if not bad and n > 0:
            lo = max(0, L - n - window_left) if window_left >= 0 else 0
            for j in range(lo, L):
                if not 0 <= bt[b, j // ps] < P:
                    bad = True
        if bad:
            out[t0:t0 + n] = np.nan
            lse[t0:t0 + n] = np.nan
            continue
        for i in range(n):
            t, pos = t0 + i, L - n + i
            for h in range(Hq):
                logits, values = [], []
                for j in range(L):
                    if causal and j > pos:
                        continue
                    if window_left >= 0 and pos - j > window_left:
                        continue
                    kj, vj = _key_value(k_pages, v_pages, layout, bt[b, j // ps], j % ps,
                                        h // group)
                    s = scale * float(np.dot(q[t, h], kj * k_scale))
                    if soft_cap is not None:
                        s = soft_cap * math.tanh(s / soft_cap)
                    logits.append(s)
                    values.append(vj * v_scale)
                if not logits:
                    continue                       # out 0, lse -inf
                m = max(logits)
                if sinks is not None:
                    m = max(m, float(sinks[h]))
                weights = [math.exp(s - m) for s in logits]
                den = sum(weights) + (math.exp(float(sinks[h]) - m) if sinks is not None else 0)
                out[t, h] = sum(w * v for w, v in zip(weights, values)) / den
                lse[t, h] = m + math.log(den)
    return out, lse


# --------------------------------------------------------------------------------------------
# Random cases (never zeros) and comparison
# --------------------------------------------------------------------------------------------

def make_pages(rng, P, ps, Hkv, D, layout, combined, dtype):
    shape = (P, ps, Hkv, D) if layout == "NHD" else (P, Hkv, ps, D)
    if combined:
        shape = (P, 2) + shape[1:]
    k = (rng.standard_normal(shape) * 1.5).astype(np.float32).astype(dtype)
    v = None if combined else (rng.standard_normal(shape) * 1.5).astype(np.float32).astype(dtype)
    return k, v


def make_case(seed, *, seq_lens, T, Hq=4, Hkv=2, D=16, ps=4, layout="NHD", combined=False,
              page_dtype=np.float32, q_dtype=np.float32, extra_pages=3):
    """Pages, a block table with distinct shuffled pages, and q [T, Hq, D]."""
    rng = np.random.default_rng(seed)
    B = len(seq_lens)
    M = max(1, max(-(-max(L, 0) // ps) for L in seq_lens)) + 1     # one spare column
    P = B * M + extra_pages
    kp, vp = make_pages(rng, P, ps, Hkv, D, layout, combined, page_dtype)
    bt = rng.permutation(P)[:B * M].reshape(B, M).astype(np.int32)
    q = rng.standard_normal((T, Hq, D)).astype(np.float32).astype(q_dtype)
    return dict(q=q, k_pages=kp, v_pages=vp, block_tables=bt,
                seq_lens=np.asarray(seq_lens, np.int32), rng=rng)


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def assert_matches(got_out, got_lse, want_out, want_lse, rtol=RTOL):
    got_out = np.asarray(got_out).astype(np.float64)
    got_lse = np.asarray(got_lse).astype(np.float64)
    # NaN exactly where expected (whole rows), nowhere else.
    np.testing.assert_array_equal(np.isnan(got_out), np.isnan(want_out))
    np.testing.assert_array_equal(np.isnan(got_lse), np.isnan(want_lse))
    # -inf lse exactly where expected (rows with no visible key, padding rows).
    np.testing.assert_array_equal(np.isneginf(got_lse), np.isneginf(want_lse))
    fin = ~np.isnan(want_out)
    assert np.isfinite(got_out[fin]).all()
    if fin.any():
        assert rel_l2(got_out[fin], want_out[fin]) <= rtol, rel_l2(got_out[fin], want_out[fin])
    # Rows expected to be exactly 0 are exactly 0.
    zero_rows = np.isneginf(want_lse)
    assert (got_out[zero_rows] == 0).all()
    fl = np.isfinite(want_lse)
    if fl.any():
        assert rel_l2(got_lse[fl], want_lse[fl]) <= rtol


def oracle_kw(kw, layout="NHD"):
    """Translate reference keyword arguments to the oracle's."""
    return dict(layout=layout, scale=kw.get("scale"),
                k_scale=float(kw.get("k_scale") or 1.0), v_scale=float(kw.get("v_scale") or 1.0),
                window_left=kw.get("window_left", -1), soft_cap=kw.get("logits_soft_cap"),
                sinks=None if kw.get("sinks") is None else np.asarray(kw["sinks"]))


def check_decode(case, n=1, layout="NHD", rtol=RTOL, **kw):
    out, lse = ref.paged_decode(case["q"], case["k_pages"], case["v_pages"],
                                case["block_tables"], case["seq_lens"], kv_layout=layout,
                                q_len_per_req=n, return_lse=True, **kw)
    assert out.dtype == (kw.get("out_dtype") or case["q"].dtype)
    assert lse.dtype == jnp.float32 and lse.shape == case["q"].shape[:2]
    want = oracle(case["q"], case["k_pages"], case["v_pages"], case["block_tables"],
                  case["seq_lens"], q_len_per_req=n, **oracle_kw(kw, layout))
    assert_matches(out, lse, *want, rtol=rtol)
    return out, lse, want


def check_prefill(case, cu, max_q_len, causal=True, layout="NHD", rtol=RTOL, **kw):
    out, lse = ref.paged_prefill(case["q"], case["k_pages"], case["v_pages"],
                                 case["block_tables"], case["seq_lens"],
                                 np.asarray(cu, np.int32), max_q_len=max_q_len, causal=causal,
                                 kv_layout=layout, return_lse=True, **kw)
    want = oracle(case["q"], case["k_pages"], case["v_pages"], case["block_tables"],
                  case["seq_lens"], np.asarray(cu), max_q_len=max_q_len, causal=causal,
                  **oracle_kw(kw, layout))
    assert_matches(out, lse, *want, rtol=rtol)
    return out, lse, want


def layout_args(layout):
    """'combined' = NHD combined pages; 'combined_hnd' = HND combined pages."""
    if layout == "combined":
        return "NHD", True
    if layout == "combined_hnd":
        return "HND", True
    return layout, False


# --------------------------------------------------------------------------------------------
# Decode
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("group", [1, 2, 5])
@pytest.mark.parametrize("layout", ["NHD", "HND", "combined"])
def test_decode_gqa_layouts(group, layout):
    kv_layout, combined = layout_args(layout)
    Hkv = 2
    case = make_case(group * 7 + len(layout), seq_lens=[7, 1, 13], T=3, Hq=Hkv * group,
                     Hkv=Hkv, D=8, ps=4, layout=kv_layout, combined=combined)
    check_decode(case, layout=kv_layout)


@pytest.mark.parametrize("ps", [1, 3, 16])
def test_decode_page_sizes(ps):
    case = make_case(100 + ps, seq_lens=[17, 3, 16, 1], T=4, ps=ps, layout="HND")
    check_decode(case, layout="HND")


@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("layout", ["NHD", "combined_hnd"])
def test_decode_fp8_scales(traced, layout):
    kv_layout, combined = layout_args(layout)
    case = make_case(200, seq_lens=[9, 20], T=2, Hq=6, Hkv=2, layout=kv_layout,
                     combined=combined, page_dtype=FP8)
    ks, vs = (0.37, 1.9)
    kw = dict(k_scale=jnp.float32(ks) if traced else ks, v_scale=jnp.float32(vs) if traced else vs)
    out, lse = ref.paged_decode(case["q"], case["k_pages"], case["v_pages"],
                                case["block_tables"], case["seq_lens"], kv_layout=kv_layout,
                                return_lse=True, **kw)
    want = oracle(case["q"], case["k_pages"], case["v_pages"], case["block_tables"],
                  case["seq_lens"], layout=kv_layout, k_scale=ks, v_scale=vs)
    assert_matches(out, lse, *want)


@pytest.mark.parametrize("name,kw", [
    ("window", dict(window_left=3)),
    ("window0", dict(window_left=0)),
    ("sinks", dict(sinks=np.array([0.5, -1.0, 2.5, 0.0], np.float32))),
    ("big_sinks", dict(sinks=np.array([200.0, -200.0, 0.0, 90.0], np.float32))),
    ("softcap", dict(logits_soft_cap=2.0, scale=0.9)),
    ("all", dict(window_left=5, logits_soft_cap=3.0, k_scale=0.5, v_scale=1.5,
                 sinks=np.array([1.0, -0.5, 3.0, 0.2], np.float32))),
])
def test_decode_features(name, kw):
    case = make_case(300, seq_lens=[11, 2, 30], T=3, Hq=4, Hkv=1, ps=3)
    check_decode(case, **kw)


@pytest.mark.parametrize("window_left", [-1, 4])
def test_decode_q_len_per_req(window_left):
    case = make_case(400, seq_lens=[5, 3, 12], T=9, Hq=6, Hkv=3, ps=4, layout="HND")
    check_decode(case, n=3, layout="HND", window_left=window_left,
                 sinks=np.linspace(-1, 1, 6).astype(np.float32))


def test_decode_bf16():
    case = make_case(500, seq_lens=[8, 21], T=2, page_dtype=BF16, q_dtype=BF16)
    out, lse = ref.paged_decode(case["q"], case["k_pages"], case["v_pages"],
                                case["block_tables"], case["seq_lens"], return_lse=True)
    assert out.dtype == jnp.bfloat16
    want_out, want_lse = oracle(case["q"], case["k_pages"], case["v_pages"],
                                case["block_tables"], case["seq_lens"])
    assert rel_l2(out, want_out) < 1e-2          # bf16 output rounding only
    assert rel_l2(lse, want_lse) < 1e-5          # lse stays float32
    out32 = ref.paged_decode(case["q"], case["k_pages"], case["v_pages"], case["block_tables"],
                             case["seq_lens"], out_dtype=jnp.float32)
    assert out32.dtype == jnp.float32 and rel_l2(out32, want_out) < RTOL


def test_decode_view_query():
    """q sliced out of a packed projection as a StridedView."""
    rng = np.random.default_rng(600)
    Hq, Hkv, D = 4, 2, 8
    case = make_case(601, seq_lens=[6, 10], T=2, Hq=Hq, Hkv=Hkv, D=D)
    qkv = jnp.asarray(rng.standard_normal((2, (Hq + 2 * Hkv) * D)).astype(np.float32))
    qv, _, _ = views.split_qkv(qkv, Hq, Hkv)
    case["q"] = np.asarray(qkv[:, :Hq * D]).reshape(2, Hq, D)
    out = ref.paged_decode(qv, case["k_pages"], case["v_pages"], case["block_tables"],
                           case["seq_lens"])
    want, _ = oracle(case["q"], case["k_pages"], case["v_pages"], case["block_tables"],
                     case["seq_lens"])
    assert rel_l2(out, want) <= RTOL


def test_decode_under_jit_traced_metadata():
    case = make_case(700, seq_lens=[9, 4, 14], T=3, page_dtype=FP8)

    @jax.jit
    def f(q, kp, vp, bt, sl, ks):
        return ref.paged_decode(q, kp, vp, bt, sl, k_scale=ks, v_scale=0.75, window_left=6,
                                return_lse=True)

    out, lse = f(case["q"], case["k_pages"], case["v_pages"], case["block_tables"],
                 case["seq_lens"], jnp.float32(1.25))
    want = oracle(case["q"], case["k_pages"], case["v_pages"], case["block_tables"],
                  case["seq_lens"], k_scale=1.25, v_scale=0.75, window_left=6)
    assert_matches(out, lse, *want)


# --------------------------------------------------------------------------------------------
# Prefill
# --------------------------------------------------------------------------------------------

# Ragged q lengths including a 0-length request; KV lengths >= q lengths (chunked prefill).
PREFILL_Q = [5, 0, 1, 7]
PREFILL_KV = [9, 6, 1, 7]


def prefill_cu(q_lens, start=0):
    return np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32) + start


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("layout", ["NHD", "HND", "combined"])
def test_prefill_ragged(causal, layout):
    kv_layout, combined = layout_args(layout)
    T = sum(PREFILL_Q)
    case = make_case(800 + causal, seq_lens=PREFILL_KV, T=T, Hq=6, Hkv=2, ps=3,
                     layout=kv_layout, combined=combined)
    check_prefill(case, prefill_cu(PREFILL_Q), max_q_len=8, causal=causal, layout=kv_layout)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window_left", [0, 2])
def test_prefill_window(causal, window_left):
    T = sum(PREFILL_Q)
    case = make_case(900, seq_lens=PREFILL_KV, T=T, Hq=5, Hkv=1, ps=2)
    check_prefill(case, prefill_cu(PREFILL_Q), max_q_len=7, causal=causal,
                  window_left=window_left)


def test_prefill_sinks_softcap_fp8():
    T = sum(PREFILL_Q)
    case = make_case(950, seq_lens=PREFILL_KV, T=T, Hq=4, Hkv=2, ps=4, layout="HND",
                     page_dtype=FP8)
    check_prefill(case, prefill_cu(PREFILL_Q), max_q_len=7, layout="HND", k_scale=0.6,
                  v_scale=2.0, logits_soft_cap=1.5,
                  sinks=np.array([0.3, 4.0, -2.0, 1.0], np.float32))


def test_prefill_padding_rows():
    """Rows before cu[0] and after cu[B] belong to no request: out 0, lse -inf."""
    q_lens = [3, 4]
    T = 2 + sum(q_lens) + 3
    case = make_case(1000, seq_lens=[6, 4], T=T, ps=4)
    out, lse, _ = check_prefill(case, prefill_cu(q_lens, start=2), max_q_len=4,
                                sinks=np.ones(4, np.float32))
    pad = np.r_[0:2, T - 3:T]
    assert (np.asarray(out)[pad] == 0).all() and np.isneginf(np.asarray(lse)[pad]).all()


def test_prefill_padding_rows_next_to_invalid_request():
    """Leading padding rows stay 0 / -inf even when the first request is invalid."""
    q_lens = [3, 4]
    case = make_case(1050, seq_lens=[2, 4], T=10, ps=4)       # request 0: seq_len < q_len
    out, lse, _ = check_prefill(case, prefill_cu(q_lens, start=2), max_q_len=4)
    out, lse = np.asarray(out), np.asarray(lse)
    assert (out[:2] == 0).all() and np.isneginf(lse[:2]).all()
    assert np.isnan(out[2:5]).all() and np.isfinite(out[5:]).all()


@pytest.mark.parametrize("layout", ["NHD", "combined_hnd"])
def test_garbage_in_unread_slots(layout):
    """NaN/inf in slots no row may see (past seq_len, before the window) never leaks."""
    kv_layout, combined = layout_args(layout)
    case = make_case(1070, seq_lens=[6, 13], T=2, ps=4, layout=kv_layout, combined=combined,
                     page_dtype=FP8)
    bt, ps = case["block_tables"], 4
    for b, L in enumerate([6, 13]):
        for j in list(range(L, bt.shape[1] * ps)) + ([0, 1, 2] if b == 1 else []):
            page, slot = bt[b, j // ps], j % ps
            for arr in ([case["k_pages"]] if combined else [case["k_pages"], case["v_pages"]]):
                idx = (page, slice(None)) if combined else (page,)
                if kv_layout == "NHD":
                    arr[idx + (slot,)] = np.nan
                else:
                    arr[idx + (slice(None), slot)] = np.nan
    assert np.isnan(case["k_pages"].astype(np.float32)).any()
    out, _, _ = check_decode(case, layout=kv_layout, window_left=9)   # request 1 sees 3..12
    assert np.isfinite(np.asarray(out)).all()


def test_prefill_empty_kv_request():
    """kv_len 0 with q_len 0 is valid and owns nothing; neighbours are exact."""
    q_lens = [2, 0, 3]
    case = make_case(1100, seq_lens=[4, 0, 3], T=5, ps=2)
    check_prefill(case, prefill_cu(q_lens), max_q_len=3)


def test_no_visible_key_row():
    """A row whose mask is empty gives 0 / -inf even with a sink. (With valid metadata every
    row sees at least key pos, so this is reachable only through the helper.)"""
    q = jnp.ones((2, 4, 8), jnp.float32)
    k = v = jnp.ones((5, 2, 8), jnp.float32)
    vis = jnp.array([[False] * 5, [True, False, False, False, False]])
    o, l = ref._softmax_attend(q, k, v, vis, jnp.float32(0.5), None, jnp.full((4,), 3.0))
    assert (np.asarray(o[0]) == 0).all() and np.isneginf(np.asarray(l[0])).all()
    assert np.isfinite(np.asarray(l[1])).all()


def test_prefill_chunked_loops():
    """Tiny memory budget: many row chunks per request and one request per step."""
    q_lens = [5, 0, 6, 2]
    case = make_case(1200, seq_lens=[8, 3, 6, 9], T=14, Hq=4, Hkv=2, ps=3)
    old = ref._STEP_BUDGET_BYTES
    ref._STEP_BUDGET_BYTES = 4096
    try:
        rows, chunks, group = ref._plan(4, 6, 12, 4, 2, 16, 4, ref._STEP_BUDGET_BYTES)
        assert rows < 6 and chunks > 1 and group == 1
        check_prefill(case, prefill_cu(q_lens), max_q_len=6, window_left=3)
        dcase = make_case(1201, seq_lens=[8, 3, 6, 9, 1], T=5, Hq=4, Hkv=2, ps=3)
        check_decode(dcase)
    finally:
        ref._STEP_BUDGET_BYTES = old


# --------------------------------------------------------------------------------------------
# Invalid runtime metadata: NaN in exactly that request's rows
# --------------------------------------------------------------------------------------------

def _corrupt_decode(case, what):
    bt, sl = case["block_tables"].copy(), case["seq_lens"].copy()
    P = case["k_pages"].shape[0]
    if what == "page_too_big":
        bt[1, 0] = P
    elif what == "page_negative":
        bt[1, (sl[1] - 1) // 4] = -3
    elif what == "seq_len_over_capacity":
        sl[1] = bt.shape[1] * 4 + 1
    elif what == "seq_len_negative":
        sl[1] = -2
    elif what == "seq_len_below_q_len":
        sl[1] = 1                                  # q_len_per_req is 2
    case = dict(case, block_tables=bt, seq_lens=sl)
    return case


@pytest.mark.parametrize("what", ["page_too_big", "page_negative", "seq_len_over_capacity",
                                  "seq_len_negative", "seq_len_below_q_len"])
def test_decode_invalid(what):
    case = make_case(1300, seq_lens=[6, 10, 7], T=6, Hq=4, Hkv=2, ps=4)
    case = _corrupt_decode(case, what)
    out, lse, want = check_decode(case, n=2)
    nan_rows = np.isnan(np.asarray(out)).any(axis=(1, 2))
    np.testing.assert_array_equal(nan_rows, [False, False, True, True, False, False])
    assert np.isnan(np.asarray(out)[2:4]).all() and np.isnan(np.asarray(lse)[2:4]).all()


def test_decode_unneeded_bad_page_is_fine():
    """With a window, a bad page index before the first needed key is not an error."""
    case = make_case(1400, seq_lens=[6, 15], T=2, ps=4)
    case["block_tables"][1, 0] = -1                # keys 0..3; needed keys start at 15-1-8=6
    case["block_tables"][1, 4] = 10 ** 6          # pages past the length are never needed
    out, lse, _ = check_decode(case, window_left=8)
    assert np.isfinite(np.asarray(out)).all()
    # Without the window the same page is needed.
    out, _, _ = check_decode(case)
    assert np.isnan(np.asarray(out)[1]).all() and np.isfinite(np.asarray(out)[0]).all()


@pytest.mark.parametrize("what", ["non_monotonic", "non_monotonic_overlap", "cu_end_past_T",
                                  "q_len_over_max",
                                  "cu_first_negative", "seq_len_below_q_len",
                                  "page_out_of_range", "seq_len_over_capacity"])
def test_prefill_invalid(what):
    q_lens = [3, 2, 4]
    case = make_case(1500, seq_lens=[5, 4, 6], T=10, Hq=4, Hkv=2, ps=2)
    cu = prefill_cu(q_lens)                       # [0, 3, 5, 9], T = 10 (one padding row)
    max_q_len = 4
    expect_nan = np.zeros(10, bool)
    if what == "non_monotonic":
        cu = np.array([0, 3, 2, 6], np.int32)    # request 1 ends before it starts (owns no
        expect_nan[3:6] = True                   # rows); request 2 starts before the running
                                                 # max 3: owns rows [3, 6), invalid
    elif what == "non_monotonic_overlap":
        cu = np.array([0, 4, 2, 6], np.int32)    # request 2 would overlap request 0: it owns
        expect_nan[4:6] = True                   # [4, 6) and is invalid; request 0 is exact
    elif what == "cu_end_past_T":
        cu = np.array([0, 3, 5, 11], np.int32)   # request 2 owns rows [5, 10) and is invalid
        max_q_len = 6                            # (its 6 rows alone would be fine)
        expect_nan[5:10] = True
    elif what == "q_len_over_max":
        max_q_len = 3                            # request 2 has 4 rows
        expect_nan[5:9] = True
    elif what == "cu_first_negative":
        cu = np.array([-1, 3, 5, 9], np.int32)   # request 0 owns rows [0, 3)
        expect_nan[0:3] = True
    elif what == "seq_len_below_q_len":
        case["seq_lens"][1] = 1
        expect_nan[3:5] = True
    elif what == "page_out_of_range":
        case["block_tables"][0, 1] = case["k_pages"].shape[0] + 5
        expect_nan[0:3] = True
    elif what == "seq_len_over_capacity":
        case["seq_lens"][2] = case["block_tables"].shape[1] * 2 + 1
        expect_nan[5:9] = True
    out, lse, want = check_prefill(case, cu, max_q_len=max_q_len)
    np.testing.assert_array_equal(np.isnan(np.asarray(out)).any(axis=(1, 2)), expect_nan)
    np.testing.assert_array_equal(np.isnan(np.asarray(lse)).any(axis=1), expect_nan)
    assert np.isfinite(np.asarray(out)[~expect_nan]).all()


# --------------------------------------------------------------------------------------------
# append_kv
# --------------------------------------------------------------------------------------------

def _read_slot(pages, v_pages, layout, slot, ps):
    page, off = slot // ps, slot % ps
    P = pages.shape[0]
    hkv = pages.shape[-2] if layout == "NHD" else (pages.shape[-3])
    ks, vs = [], []
    for h in range(hkv):
        k, v = _key_value(np.asarray(pages), None if v_pages is None else np.asarray(v_pages),
                          layout, page, off, h)
        ks.append(k)
        vs.append(v)
    return np.stack(ks), np.stack(vs)


@pytest.mark.parametrize("layout", ["NHD", "HND", "combined", "combined_hnd"])
@pytest.mark.parametrize("dtype", [np.float32, BF16])
def test_append_round_trip(layout, dtype):
    kv_layout, combined = layout_args(layout)
    rng = np.random.default_rng(1600)
    P, ps, Hkv, D, T = 5, 3, 2, 8, 6
    kp, vp = make_pages(rng, P, ps, Hkv, D, kv_layout, combined, dtype)
    k = rng.standard_normal((T, Hkv, D)).astype(np.float32).astype(dtype)
    v = rng.standard_normal((T, Hkv, D)).astype(np.float32).astype(dtype)
    slots = np.array([4, -1, 0, 14, 15, 7], np.int32)   # -1 and 15 (= P*ps) are skipped
    nk, nv = ref.append_kv(kp, vp, k, v, slots, kv_layout=kv_layout)
    assert (nv is None) == combined
    assert nk.dtype == kp.dtype and nk.shape == kp.shape
    # Expected cache: a copy with the written slots replaced, built with the oracle reader.
    written = {int(s): t for t, s in enumerate(slots) if 0 <= s < P * ps}
    for slot in range(P * ps):
        got_k, got_v = _read_slot(nk, nv, kv_layout, slot, ps)
        old_k, old_v = _read_slot(kp, vp, kv_layout, slot, ps)
        if slot in written:
            t = written[slot]
            np.testing.assert_array_equal(got_k, k[t])
            np.testing.assert_array_equal(got_v, v[t])
        else:
            np.testing.assert_array_equal(got_k, old_k)
            np.testing.assert_array_equal(got_v, old_v)


@pytest.mark.parametrize("layout", ["NHD", "combined_hnd"])
@pytest.mark.parametrize("traced", [False, True])
def test_append_fp8_quantization(layout, traced):
    kv_layout, combined = layout_args(layout)
    rng = np.random.default_rng(1700)
    P, ps, Hkv, D, T = 4, 4, 2, 16, 5
    kp, vp = make_pages(rng, P, ps, Hkv, D, kv_layout, combined, FP8)
    # Wide range: values near fp8 rounding ties, tiny values, and overflow past 448 * scale.
    k = (rng.standard_normal((T, Hkv, D)) * 300).astype(np.float32)
    v = (rng.standard_normal((T, Hkv, D)) * 3).astype(np.float32)
    k[0, 0, :4] = [1e6, -1e6, 449 * 0.5, 1e-9]
    ks, vs = 0.5, 0.013
    slots = np.array([3, 9, -5, 0, 15], np.int32)

    def quant(x, s):        # independent: float32 divide, saturate, ml_dtypes RNE cast
        return np.clip(x / np.float32(s), -448, 448).astype(FP8)

    kw = dict(k_scale=jnp.float32(ks) if traced else ks, v_scale=jnp.float32(vs) if traced else vs)
    if traced:
        nk, nv = jax.jit(lambda *a: ref.append_kv(*a[:4], a[4], kv_layout=kv_layout, **kw))(
            kp, vp, k, v, slots)
    else:
        nk, nv = ref.append_kv(kp, vp, k, v, slots, kv_layout=kv_layout, **kw)
    assert nk.dtype == FP8
    for t, slot in enumerate(slots):
        if slot < 0:
            continue
        got_k, got_v = _read_slot(nk, nv, kv_layout, int(slot), ps)
        np.testing.assert_array_equal(got_k.view(np.uint8), quant(k[t], ks).view(np.uint8))
        np.testing.assert_array_equal(got_v.view(np.uint8), quant(v[t], vs).view(np.uint8))
    assert not np.isnan(np.asarray(nk).astype(np.float32)).any() or np.isnan(
        np.asarray(kp).astype(np.float32)).any()


@pytest.mark.parametrize("dtype", [np.float32, BF16, np.float16])
def test_append_scaled(dtype):
    """Non-fp8 pages: stored = (k / k_scale) in float32, rounded to nearest even."""
    rng = np.random.default_rng(1750)
    P, ps, Hkv, D, T = 3, 2, 2, 8, 4
    kp, vp = make_pages(rng, P, ps, Hkv, D, "HND", False, dtype)
    k = rng.standard_normal((T, Hkv, D)).astype(np.float32)
    v = rng.standard_normal((T, Hkv, D)).astype(np.float32).astype(BF16)   # bf16 input
    ks, vs = 0.013, 3.7
    slots = np.array([5, 0, 2, 3], np.int32)
    # Under jit XLA would turn the division into a multiply by the reciprocal (an ulp off).
    # Bit exactness is a CPU-backend property: XLA's GPU f32 division is within 2 ulp.
    cpu = jax.devices("cpu")[0]
    f = jax.jit(lambda *a: ref.append_kv(*a, kv_layout="HND", k_scale=ks, v_scale=vs))
    with jax.default_device(cpu):
        nk, nv = f(*jax.device_put((kp, vp, k, v, slots), cpu))
    for t, slot in enumerate(slots):
        got_k, got_v = _read_slot(nk, nv, "HND", int(slot), ps)
        want_k = (k[t] / np.float32(ks)).astype(dtype)
        want_v = (v[t].astype(np.float32) / np.float32(vs)).astype(dtype)
        np.testing.assert_array_equal(got_k, want_k)
        np.testing.assert_array_equal(got_v, want_v)


def test_append_rne_ties():
    """Exact halfway points between representable values round to even."""
    base = np.array([1.0, 1.125, 2.0, 2.25, 256.0, 288.0], np.float32)
    step = np.array([0.125, 0.125, 0.25, 0.25, 32.0, 32.0], np.float32)
    vals = base + step / 2          # ties: 1.0625 -> 1.0 (even), 1.1875 -> 1.25 (even), ...
    x = np.tile(vals[:, None, None], (1, 1, 4)).astype(np.float32)   # [T=6, Hkv=1, D=4]
    kp = np.full((2, 4, 1, 4), 3.0, np.float32).astype(FP8)
    nk, _ = ref.append_kv(kp, kp.copy(), x, x, np.arange(6, dtype=np.int32))
    got = np.asarray(nk).astype(np.float32).reshape(8, 4)[:6, 0]
    np.testing.assert_array_equal(got, vals.astype(FP8).astype(np.float32))
    np.testing.assert_array_equal(got, [1.0, 1.25, 2.0, 2.5, 256.0, 320.0])


def test_append_then_attend():
    """Write a request's KV through append_kv, then decode over it."""
    rng = np.random.default_rng(1800)
    P, ps, Hkv, D, L = 6, 4, 2, 8, 10
    kp = np.asarray(rng.standard_normal((P, ps, Hkv, D)), np.float32)
    vp = np.asarray(rng.standard_normal((P, ps, Hkv, D)), np.float32)
    pages = np.array([4, 1, 5], np.int32)
    k = rng.standard_normal((L, Hkv, D)).astype(np.float32)
    v = rng.standard_normal((L, Hkv, D)).astype(np.float32)
    slots = (pages[np.arange(L) // ps] * ps + np.arange(L) % ps).astype(np.int32)
    nk, nv = ref.append_kv(kp, vp, k, v, slots)
    q = rng.standard_normal((1, 4, D)).astype(np.float32)
    out = ref.paged_decode(q, nk, nv, pages[None], np.array([L], np.int32))
    # Dense attention over k, v directly.
    s = np.einsum("hd,jhd->hj", q[0], np.repeat(k, 2, axis=1)) / math.sqrt(D)
    p = np.exp(s - s.max(-1, keepdims=True))
    want = np.einsum("hj,jhd->hd", p / p.sum(-1, keepdims=True), np.repeat(v, 2, axis=1))
    assert rel_l2(out[0], want) <= RTOL


# --------------------------------------------------------------------------------------------
# Memory: the reference is also the oracle at serving sizes
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("page_dtype", [jnp.bfloat16, jnp.float8_e4m3fn])
def test_memory_bounded(page_dtype):
    """Compile only: decode B=256 x L=1024, Hq=32, Hkv=8, D=128 must not materialize a float32
    copy of the cache (a 1 GiB bf16 pool here) or a [T, Hq, B, L] tensor."""
    B, L, Hq, Hkv, D, ps = 256, 1024, 32, 8, 128, 16
    P = B * L // ps
    S = jax.ShapeDtypeStruct
    args = (S((B, Hq, D), jnp.bfloat16), S((P, ps, Hkv, D), page_dtype),
            S((P, ps, Hkv, D), page_dtype), S((B, L // ps), jnp.int32), S((B,), jnp.int32))
    f = jax.jit(lambda *a: ref.paged_decode(*a, k_scale=0.5, return_lse=True))
    mem = f.lower(*args).compile().memory_analysis()
    if mem is None:
        pytest.skip("no memory analysis on this backend")
    assert mem.temp_size_in_bytes < (512 << 20), mem.temp_size_in_bytes
