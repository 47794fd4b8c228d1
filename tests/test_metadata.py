"""Invalid runtime metadata: NaN rows for the bad request only, everything else exact; and
``check_metadata`` naming the first bad request, eagerly and under checkify."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import cases
import jax_paged_attn as jpa
from conftest import assert_bitwise, assert_close
from jax_paged_attn import reference as ref

pytestmark = pytest.mark.usefixtures("on_cpu")

BIG, SMALL = 2**31 - 1, -(2**31)


def _needed_cols(inp, b):
    """Block-table columns request b needs (docs/semantics.md rule 3)."""
    c = inp.case
    L = int(inp.kv_lens[b])
    n = int(inp.q_lens[b])
    lo = cases.first_needed_key(L, n, c.window_left)
    return list(range(lo // c.page_size, (L - 1) // c.page_size + 1)) if L > lo else []


def _oracle_bad(inp, max_q_len=None):
    c = inp.case
    return cases.invalid_requests(
        inp.block_tables, inp.seq_lens, num_pages=inp.num_pages, page_size=c.page_size,
        num_tokens=inp.num_tokens, cu_seqlens_q=inp.cu_seqlens_q, q_len_per_req=c.q_len_per_req,
        max_q_len=max_q_len if max_q_len is not None else inp.kwargs.get("max_q_len"),
        window_left=c.window_left)


def _check(inp, expect_bad, clean=None, **overrides):
    """Run FFI and reference on (possibly corrupted) inputs and check the NaN rules.

    expect_bad: the set of invalid requests (also checked against the semantics oracle).
    clean: results of the uncorrupted inputs; rows of other requests must be bit-identical.
    """
    kind = inp.case.kind
    fn, rfn = ((jpa.paged_decode, ref.paged_decode) if kind == "decode"
               else (jpa.paged_prefill, ref.paged_prefill))
    assert _oracle_bad(inp, overrides.get("max_q_len")) == set(expect_bad)
    out, lse = cases.run(fn, inp, return_lse=True, **overrides)
    r_out, r_lse = cases.run_reference(rfn, inp, **overrides)
    rows = cases.invalid_rows(inp, expect_bad)
    if expect_bad:
        assert rows.any(), "test bug: the invalid requests own no rows"
    assert np.isnan(out[rows].astype(np.float32)).all(), "invalid request rows must be all NaN"
    assert np.isnan(lse[rows]).all(), "invalid request lse must be NaN"
    assert not np.isnan(out[~rows].astype(np.float32)).any(), "NaN leaked into a valid request"
    assert not np.isnan(lse[~rows]).any(), "NaN leaked into a valid request's lse"
    assert_close(out, r_out, nan_ok=True)
    assert_close(lse, r_lse, cases.LSE_TOLERANCE, nan_ok=True, what="lse")
    if clean is not None:
        assert_bitwise(out[~rows], clean[0][~rows])
        assert_bitwise(lse[~rows], clean[1][~rows], "lse")
    return out, lse


# ----------------------------------------------------------------------------- decode

DECODE = cases.AttnCase(batch=4, page_size=4, max_kv_len=30, q_len_per_req=1, seed=900)
DECODE3 = dataclasses.replace(DECODE, q_len_per_req=3, seed=901)


def _set(arr, idx, val):
    a = np.array(arr, copy=True)
    a[idx] = val
    return a


def _decode_corruptions():
    """name -> (case, function(inputs) -> (inputs, expected bad set))."""
    def sl(b, val):
        return lambda inp: (inp.with_args(seq_lens=_set(inp.seq_lens, b, val)), {b})

    def page(b, which, val):
        def f(inp):
            cols = _needed_cols(inp, b)
            col = cols[0] if which == "first" else cols[-1]
            v = inp.num_pages if val is None else val
            return inp.with_args(block_tables=_set(inp.block_tables, (b, col), v)), {b}
        return f

    def over_capacity(inp):
        M = inp.block_tables.shape[1]
        return inp.with_args(seq_lens=_set(inp.seq_lens, 1, M * inp.page_size + 1)), {1}

    def two_bad(inp):
        inp = inp.with_args(seq_lens=_set(inp.seq_lens, 0, -3))
        col = _needed_cols(inp, 3)[0]
        return inp.with_args(block_tables=_set(inp.block_tables, (3, col), inp.num_pages)), {0, 3}

    def all_bad(inp):
        return inp.with_args(seq_lens=np.full_like(inp.seq_lens, -1)), {0, 1, 2, 3}

    return {
        "seq_len_negative": (DECODE, sl(1, -1)),
        "seq_len_int_min": (DECODE, sl(2, SMALL)),
        "seq_len_zero": (DECODE, sl(1, 0)),
        "seq_len_below_q_len": (DECODE3, sl(1, 2)),
        "seq_len_over_capacity": (DECODE, over_capacity),
        "seq_len_int_max": (DECODE, sl(3, BIG)),
        "page_negative_first": (DECODE, page(1, "first", -1)),
        "page_num_pages_last": (DECODE, page(2, "last", None)),
        "page_int_max": (DECODE3, page(1, "last", BIG)),
        "page_int_min": (DECODE, page(3, "first", SMALL)),
        "two_bad_requests": (DECODE, two_bad),
        "all_bad": (DECODE, all_bad),
    }


DECODE_CORRUPTIONS = _decode_corruptions()


@pytest.mark.parametrize("name", sorted(DECODE_CORRUPTIONS))
def test_decode_invalid_metadata_gives_nan_rows(name):
    case, corrupt = DECODE_CORRUPTIONS[name]
    inp = cases.make_inputs(case)
    clean = cases.run(jpa.paged_decode, inp, return_lse=True)
    bad_inp, bad = corrupt(inp)
    _check(bad_inp, bad, clean)


def test_decode_seq_len_at_capacity_is_valid():
    inp = cases.make_inputs(DECODE)
    M = inp.block_tables.shape[1]
    rng = np.random.default_rng(3)
    bt = _set(inp.block_tables, 1, rng.integers(0, inp.num_pages, M).astype(np.int32))
    inp = inp.with_args(block_tables=bt, seq_lens=_set(inp.seq_lens, 1, M * inp.page_size))
    _check(inp, set())


@pytest.mark.parametrize("needed", [False, True])
def test_decode_window_only_needed_pages_matter(needed):
    """With a window, a bad page before the window is harmless; one inside it is not."""
    case = dataclasses.replace(DECODE, window_left=2, garbage_tables=False, max_kv_len=30, seed=902)
    inp = cases.make_inputs(case)
    b = int(np.argmax(inp.kv_lens))
    assert inp.kv_lens[b] > 3 * case.page_size
    clean = cases.run(jpa.paged_decode, inp, return_lse=True)
    col = _needed_cols(inp, b)[0] if needed else 0
    assert needed or col not in _needed_cols(inp, b)
    inp = inp.with_args(block_tables=_set(inp.block_tables, (b, col), -1))
    _check(inp, {b} if needed else set(), clean)


# ----------------------------------------------------------------------------- prefill

PREFILL = cases.AttnCase(kind="prefill", batch=4, page_size=3, max_q_len=5, max_kv_len=24,
                         pad_back=2, seed=910)


def _prefill_corruptions():
    def cu(fix):
        def f(inp):
            c = np.array(inp.cu_seqlens_q, copy=True)
            bad = fix(c, inp.num_tokens)
            return inp.with_args(cu_seqlens_q=c), bad
        return f

    def first_negative(c, T):
        c[0] = -1
        return {0}

    def decreasing(c, T):
        c[2] = c[1] - 1  # request 1 ends before it starts; request 2 starts below the max
        return {1, 2}

    def last_past_end(c, T):
        c[-1] = T + 2
        return {3}

    def middle_past_end(c, T):
        c[2] = T + 5  # request 1 ends past T; requests 2, 3 then start below the running max
        return {1, 2, 3}

    def sl(b, delta_from_q=None, val=None):
        def f(inp):
            v = val if val is not None else int(inp.q_lens[b]) + delta_from_q
            return inp.with_args(seq_lens=_set(inp.seq_lens, b, v)), {b}
        return f

    def page(b, val):
        def f(inp):
            col = _needed_cols(inp, b)[-1]
            return inp.with_args(block_tables=_set(inp.block_tables, (b, col),
                                                   inp.num_pages if val is None else val)), {b}
        return f

    def over_capacity(inp):
        M = inp.block_tables.shape[1]
        return inp.with_args(seq_lens=_set(inp.seq_lens, 2, M * inp.page_size + 2)), {2}

    return {
        "cu_first_negative": cu(first_negative),
        "cu_decreasing": cu(decreasing),
        "cu_last_past_end": cu(last_past_end),
        "cu_middle_past_end": cu(middle_past_end),
        "seq_len_below_q_len": sl(1, delta_from_q=-1),
        "seq_len_negative": sl(2, val=-4),
        "seq_len_over_capacity": over_capacity,
        "page_negative": page(0, -1),
        "page_num_pages": page(3, None),
        "page_int_min": page(1, SMALL),
    }


PREFILL_CORRUPTIONS = _prefill_corruptions()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", sorted(PREFILL_CORRUPTIONS))
def test_prefill_invalid_metadata_gives_nan_rows(name, causal):
    inp = cases.make_inputs(dataclasses.replace(PREFILL, causal=causal))
    assert np.all(inp.q_lens >= 2), "test setup: every request needs rows"
    clean = cases.run(jpa.paged_prefill, inp, return_lse=True)
    bad_inp, bad = PREFILL_CORRUPTIONS[name](inp)
    rows_same = not name.startswith("cu_")  # cu corruption moves rows; others keep them
    _check(bad_inp, bad, clean if rows_same else None)


def test_prefill_q_len_over_max_q_len():
    inp = cases.make_inputs(PREFILL)
    longest = int(inp.q_lens.max())
    bad = {b for b in range(PREFILL.batch) if inp.q_lens[b] > longest - 1}
    clean = cases.run(jpa.paged_prefill, inp, return_lse=True)
    _check(inp, bad, clean, max_q_len=longest - 1)


def test_prefill_empty_request_pages_are_not_checked():
    """A q_len-0 request reads nothing: garbage in every table entry is fine."""
    case = dataclasses.replace(PREFILL, zero_q_lens=True, garbage_tables=False, seed=911)
    inp = cases.make_inputs(case)
    b = 1
    assert inp.q_lens[b] == 0 and inp.kv_lens[b] > 0
    bt = _set(inp.block_tables, b, -5)
    _check(inp.with_args(block_tables=bt), set())


@pytest.mark.parametrize("needed", [False, True])
def test_prefill_window_only_needed_pages_matter(needed):
    case = dataclasses.replace(PREFILL, window_left=1, garbage_tables=False, max_q_len=2,
                               max_kv_len=24, seed=912)
    inp = cases.make_inputs(case)
    b = int(np.argmax(inp.kv_lens - inp.q_lens))
    cols = _needed_cols(inp, b)
    assert cols[0] > 0
    col = cols[0] if needed else 0
    inp = inp.with_args(block_tables=_set(inp.block_tables, (b, col), BIG))
    _check(inp, {b} if needed else set())


# ----------------------------------------------------------------------------- check_metadata


def _meta(inp):
    c = inp.case
    kw = dict(num_pages=inp.num_pages, page_size=c.page_size)
    if c.kind == "prefill":
        kw["cu_seqlens_q"] = inp.cu_seqlens_q
    else:
        kw["q_len_per_req"] = c.q_len_per_req
    return inp.block_tables, inp.seq_lens, kw


def _full_tables(case):
    """Inputs whose every table entry is a valid page (check_metadata knows no window)."""
    return cases.make_inputs(dataclasses.replace(case, garbage_tables=False))


META_RULES = {
    # name: (base case, corruption on (bt, sl, cu) numpy copies -> the bad request)
    "decode_seq_len_negative": (DECODE, lambda bt, sl, cu, P: (sl.__setitem__(2, -1), 2)[1]),
    "decode_over_capacity": (DECODE, lambda bt, sl, cu, P: (sl.__setitem__(1, bt.shape[1] * DECODE.page_size + 1), 1)[1]),
    "decode_below_q_len": (DECODE3, lambda bt, sl, cu, P: (sl.__setitem__(3, 1), 3)[1]),
    "decode_page_negative": (DECODE, lambda bt, sl, cu, P: (bt.__setitem__((2, 0), -1), 2)[1]),
    "decode_page_too_large": (DECODE, lambda bt, sl, cu, P: (bt.__setitem__((1, 0), P), 1)[1]),
    "prefill_cu_negative": (PREFILL, lambda bt, sl, cu, P: (cu.__setitem__(0, -2), 0)[1]),
    "prefill_cu_decreasing": (PREFILL, lambda bt, sl, cu, P: (cu.__setitem__(3, cu[2] - 1), 2)[1]),
    "prefill_below_q_len": (PREFILL, lambda bt, sl, cu, P: (sl.__setitem__(1, cu[2] - cu[1] - 1), 1)[1]),
    "prefill_seq_len_negative": (PREFILL, lambda bt, sl, cu, P: (sl.__setitem__(3, -7), 3)[1]),
    "prefill_page_too_large": (PREFILL, lambda bt, sl, cu, P: (bt.__setitem__((2, 0), P + 4), 2)[1]),
}


def _corrupted_meta(name):
    case, corrupt = META_RULES[name]
    inp = _full_tables(case)
    bt, sl, kw = _meta(inp)
    bt, sl = bt.copy(), sl.copy()
    cu = kw.get("cu_seqlens_q")
    if cu is not None:
        cu = cu.copy()
        kw["cu_seqlens_q"] = cu
    b = corrupt(bt, sl, cu, inp.num_pages)
    return bt, sl, kw, b


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_check_metadata_accepts_valid(kind):
    inp = _full_tables(DECODE3 if kind == "decode" else PREFILL)
    bt, sl, kw = _meta(inp)
    jpa.check_metadata(bt, sl, **kw)  # eager: no error
    jpa.check_metadata(jnp.asarray(bt), jnp.asarray(sl), **{k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()})
    f = checkify.checkify(jax.jit(lambda bt, sl, cu: jpa.check_metadata(
        bt, sl, **dict(kw, **({"cu_seqlens_q": cu} if cu is not None else {})))))
    err, _ = f(bt, sl, kw.get("cu_seqlens_q"))
    assert err.get() is None
    err.throw()  # no-op when there is no error


@pytest.mark.parametrize("name", sorted(META_RULES))
def test_check_metadata_eager_names_the_request(name):
    bt, sl, kw, b = _corrupted_meta(name)
    with pytest.raises(ValueError, match=rf"request {b}\b"):
        jpa.check_metadata(bt, sl, **kw)


@pytest.mark.parametrize("name", sorted(META_RULES))
def test_check_metadata_checkify_names_the_request(name):
    bt, sl, kw, b = _corrupted_meta(name)
    cu = kw.pop("cu_seqlens_q", None)

    def f(bt, sl, cu):
        extra = {"cu_seqlens_q": cu} if cu is not None else {}
        jpa.check_metadata(bt, sl, **kw, **extra)
        return jnp.sum(sl)

    err, out = checkify.checkify(jax.jit(f))(bt, sl, cu)
    msg = err.get()
    assert msg is not None and f"request {b}" in msg, msg
    assert int(out) == int(np.sum(sl, dtype=np.int32))  # the function still ran
    with pytest.raises(checkify.JaxRuntimeError, match=rf"request {b}\b"):
        err.throw()


def _two_bad():
    """Request 1 has a bad page and request 3 a negative seq_len (different rules)."""
    inp = _full_tables(DECODE)
    bt, sl, kw = _meta(inp)
    return _set(bt, (1, 0), inp.num_pages + 9), _set(sl, 3, -1), kw


def test_check_metadata_eager_names_the_first_bad_request():
    bt, sl, kw = _two_bad()
    with pytest.raises(ValueError, match=r"request 1\b") as ei:
        jpa.check_metadata(bt, sl, **kw)
    assert "request 3" not in str(ei.value)


@pytest.mark.parametrize("jit", [False, True])
def test_check_metadata_checkify_names_the_first_bad_request(jit):
    bt, sl, kw = _two_bad()
    f = lambda a, b: jpa.check_metadata(a, b, **kw)  # noqa: E731
    err, _ = checkify.checkify(jax.jit(f) if jit else f)(bt, sl)
    msg = err.get()
    assert msg is not None and "request 1" in msg and "request 3" not in msg, msg


def test_checkify_with_attention_in_the_same_function():
    """check_metadata and paged_decode together under checkify(jit): error + NaN rows."""
    inp = _full_tables(DECODE)
    bt, sl, kw = _meta(inp)
    sl = _set(sl, 2, -1)
    args = inp.with_args(seq_lens=sl).args
    opts = dict(inp.kwargs, return_lse=True)

    def step(q, kp, vp, bt, sl):
        jpa.check_metadata(bt, sl, **kw)
        return jpa.paged_decode(q, kp, vp, bt, sl, **opts)

    err, (out, lse) = checkify.checkify(jax.jit(step))(*args)
    assert "request 2" in err.get()
    out = np.asarray(out)
    assert np.isnan(out[2]).all() and not np.isnan(np.delete(out, 2, axis=0)).any()


def test_check_metadata_ignores_pages_of_zero_length_prefill_requests():
    # Semantics rule 3: pages are only needed by requests that own query rows.
    bt = jnp.asarray([[0, 1], [-1, -1]], jnp.int32)
    sl = jnp.asarray([5, 3], jnp.int32)
    cu = jnp.asarray([0, 5, 5], jnp.int32)
    jpa.check_metadata(bt, sl, num_pages=4, page_size=4, cu_seqlens_q=cu)
    with pytest.raises(ValueError, match=r"request 1\b"):
        jpa.check_metadata(bt, sl, num_pages=4, page_size=4,
                           cu_seqlens_q=jnp.asarray([0, 2, 3], jnp.int32))


def test_check_metadata_agrees_with_the_oracle_on_fuzzed_metadata():
    """On the fuzz generator's metadata (valid and broken by every rule), check_metadata given
    what the op call is given raises exactly when the plain-Python oracle finds a bad
    request, and names the first one."""
    import re

    import fuzz
    checked = raised = 0
    for config_seed in range(10):
        for draw in range(8):
            case = fuzz.draw_case(config_seed, draw)
            cfg, inp, c = case.config, case.inputs, case.config.case
            prefill = c.kind == "prefill"
            bad = cases.invalid_requests(
                inp.block_tables, inp.seq_lens, num_pages=cfg.num_pages, page_size=c.page_size,
                num_tokens=cfg.num_tokens, cu_seqlens_q=inp.cu_seqlens_q,
                q_len_per_req=c.q_len_per_req, max_q_len=cfg.max_q_len if prefill else None,
                window_left=c.window_left)
            layer_bad = bool(cfg.num_layers) and not 0 <= case.layer < cfg.num_layers
            kw = dict(num_pages=cfg.num_pages, page_size=c.page_size,
                      cu_seqlens_q=inp.cu_seqlens_q, q_len_per_req=c.q_len_per_req,
                      num_tokens=cfg.num_tokens, max_q_len=cfg.max_q_len if prefill else None,
                      window_left=c.window_left)
            if cfg.num_layers:
                kw.update(layer=case.layer, num_layers=cfg.num_layers)
            checked += 1
            try:
                jpa.check_metadata(inp.block_tables, inp.seq_lens, **kw)
            except ValueError as e:
                raised += 1
                msg = str(e)
                assert bad or layer_bad, (case.repro(), msg)
                if layer_bad:
                    assert "layer" in msg, (case.repro(), msg)
                else:
                    assert re.search(rf"request {min(bad)}\b", msg), (case.repro(), bad, msg)
            else:
                assert not bad and not layer_bad, (case.repro(), bad)
    assert raised > 10 and checked - raised > 10, (checked, raised)  # both kinds were seen


@pytest.mark.parametrize("rule", ["cu_end", "max_q_len"])
def test_check_metadata_row_rules_of_prefill(rule):
    """The two rules only the call's shapes decide: cu_seqlens_q ending past q's rows, and a
    query length over max_q_len. Checked when given, named, eager and under checkify."""
    bt = np.arange(8, dtype=np.int32).reshape(2, 4)
    sl = np.array([10, 12], np.int32)
    cu = np.array([0, 3, 9], np.int32)                   # request 1: rows 3..8, q_len 6
    kw = dict(num_pages=8, page_size=4, cu_seqlens_q=cu)
    extra = dict(num_tokens=8) if rule == "cu_end" else dict(max_q_len=5)
    jpa.check_metadata(bt, sl, **kw)                     # without them: nothing to report
    words = "ends at 9, past the 8" if rule == "cu_end" else "query length 6 exceeds max_q_len 5"
    with pytest.raises(ValueError, match=f"request 1: .*{words}"):
        jpa.check_metadata(bt, sl, **kw, **extra)
    assert cases.invalid_requests(bt, sl, num_pages=8, page_size=4, num_tokens=extra.get(
        "num_tokens", 9), cu_seqlens_q=cu, max_q_len=extra.get("max_q_len")) == {1}
    f = checkify.checkify(jax.jit(lambda bt, sl, cu: jpa.check_metadata(
        bt, sl, num_pages=8, page_size=4, cu_seqlens_q=cu, **extra)))
    err, _ = f(bt, sl, cu)
    assert err.get() is not None and "request 1" in err.get()
