"""Static misuse raises ValueError / TypeError at trace time, naming the argument.

Every call goes through ``jax.eval_shape`` on abstract operands: nothing runs, so the error
can only come from tracing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_paged_attn as jpa

pytestmark = pytest.mark.usefixtures("on_cpu")

S = jax.ShapeDtypeStruct
BF16, F32, I32 = jnp.bfloat16, jnp.float32, jnp.int32
T, HQ, HKV, D, P, PS, B, M = 4, 4, 2, 16, 6, 4, 4, 3

Q = S((T, HQ, D), BF16)
KP = S((P, PS, HKV, D), BF16)
BT = S((B, M), I32)
SL = S((B,), I32)
CU = S((B + 1,), I32)
KNEW = S((T, HKV, D), BF16)
SLOTS = S((T,), I32)


def decode(q=Q, k=KP, v=KP, bt=BT, sl=SL, **kw):
    return jax.eval_shape(lambda q, k, v, bt, sl: jpa.paged_decode(q, k, v, bt, sl, **kw), q, k, v, bt, sl)


def prefill(q=Q, k=KP, v=KP, bt=BT, sl=SL, cu=CU, max_q_len=4, **kw):
    return jax.eval_shape(
        lambda q, k, v, bt, sl, cu: jpa.paged_prefill(q, k, v, bt, sl, cu, max_q_len=max_q_len, **kw),
        q, k, v, bt, sl, cu)


def append(k_pages=KP, v_pages=KP, k=KNEW, v=KNEW, slots=SLOTS, **kw):
    return jax.eval_shape(lambda a, b, c, d, e: jpa.append_kv(a, b, c, d, e, **kw),
                          k_pages, v_pages, k, v, slots)


def decode_view(base, shape, strides, offset=0):
    """paged_decode on StridedView(base, ...) built from a traced base."""
    def f(b, k, v, bt, sl):
        return jpa.paged_decode(jpa.StridedView(b, shape, strides, offset), k, v, bt, sl)
    return jax.eval_shape(f, base, KP, KP, BT, SL)


def split(qkv, hq=HQ, hkv=HKV, **kw):
    """paged_decode on the q view of split_qkv(qkv, ...) built from a traced packed buffer."""
    def f(x, k, v, bt, sl):
        q, _, _ = jpa.split_qkv(x, hq, hkv, **kw)
        return jpa.paged_decode(q, k, v, bt, sl)
    return jax.eval_shape(f, qkv, KP, KP, BT, SL)


FP8 = jnp.float8_e4m3fn
W = (HQ + 2 * HKV) * D

MISUSES = {
    # --- paged_decode: q
    "q_rank2": (lambda: decode(q=S((T, HQ * D), BF16)), r"\bq\b"),
    "q_rank4": (lambda: decode(q=S((T, 1, HQ, D), BF16)), r"\bq\b"),
    "q_int_dtype": (lambda: decode(q=S((T, HQ, D), I32)), r"\bq\b"),
    "q_fp8": (lambda: decode(q=S((T, HQ, D), FP8), k=S(KP.shape, FP8), v=S(KP.shape, FP8)), r"\bq\b"),
    "heads_not_divisible": (lambda: decode(q=S((T, 3, D), BF16)), r"\bq\b.*num_kv_heads|num_kv_heads.*\bq\b|q: .*multiple"),
    "head_dim_mismatch": (lambda: decode(q=S((T, HQ, 2 * D), BF16)), r"head_dim"),
    "head_dim_mismatch_hnd": (lambda: decode(k=S((P, HKV, PS, 32), BF16), v=S((P, HKV, PS, 32), BF16),
                                             kv_layout="HND"), r"head_dim"),
    # --- pages
    "k_pages_rank3": (lambda: decode(k=S((P, PS, HKV * D), BF16), v=S((P, PS, HKV * D), BF16)), r"k_pages"),
    "k_pages_int_dtype": (lambda: decode(k=S(KP.shape, jnp.int8), v=S(KP.shape, jnp.int8)), r"k_pages"),
    "bad_kv_layout": (lambda: decode(kv_layout="NDH"), r"kv_layout"),
    "bad_kv_layout_type": (lambda: decode(kv_layout=1), r"kv_layout"),
    "v_pages_shape": (lambda: decode(v=S((P + 1, PS, HKV, D), BF16)), r"v_pages"),
    "v_pages_dtype": (lambda: decode(v=S(KP.shape, jnp.float16)), r"v_pages"),
    "combined_axis1_not_2": (lambda: decode(k=S((P, 3, PS, HKV, D), BF16), v=None), r"k_pages"),
    "combined_with_v_pages": (lambda: decode(k=S((P, 2, PS, HKV, D), BF16), v=S((P, 2, PS, HKV, D), BF16)),
                              r"k_pages|v_pages"),
    "v_pages_none_4d": (lambda: decode(v=None), r"k_pages|v_pages"),
    # --- metadata
    "block_tables_f32": (lambda: decode(bt=S((B, M), F32)), r"block_tables"),
    "block_tables_int16": (lambda: decode(bt=S((B, M), jnp.int16)), r"block_tables"),
    "block_tables_uint32": (lambda: decode(bt=S((B, M), jnp.uint32)), r"block_tables"),
    "block_tables_rank1": (lambda: decode(bt=S((B * M,), I32)), r"block_tables"),
    "seq_lens_shape": (lambda: decode(sl=S((B + 1,), I32)), r"seq_lens"),
    "seq_lens_dtype": (lambda: decode(sl=S((B,), F32)), r"seq_lens"),
    "seq_lens_rank2": (lambda: decode(sl=S((B, 1), I32)), r"seq_lens"),
    "tokens_not_batch_times_n": (lambda: decode(q=S((2 * T, HQ, D), BF16)), r"q_len_per_req|\bq\b"),
    "q_len_per_req_not_dividing": (lambda: decode(q_len_per_req=3), r"q_len_per_req"),
    "q_len_per_req_zero": (lambda: decode(q_len_per_req=0), r"q_len_per_req"),
    # --- options
    "sinks_shape": (lambda: decode(sinks=jnp.zeros((HKV,), F32)), r"sinks"),
    "sinks_dtype": (lambda: decode(sinks=jnp.zeros((HQ,), I32)), r"sinks"),
    "out_dtype_int": (lambda: decode(out_dtype=jnp.int32), r"out_dtype"),
    "out_dtype_fp8": (lambda: decode(out_dtype=FP8), r"out_dtype"),
    "window_left_minus2": (lambda: decode(window_left=-2), r"window_left"),
    "soft_cap_zero": (lambda: decode(logits_soft_cap=0.0), r"logits_soft_cap"),
    "soft_cap_negative": (lambda: decode(logits_soft_cap=-1.0), r"logits_soft_cap"),
    "k_scale_vector": (lambda: decode(k_scale=jnp.ones((2,), F32)), r"k_scale"),
    "v_scale_vector": (lambda: decode(v_scale=np.ones((HKV,), np.float32)), r"v_scale"),
    # --- views
    "view_inner_stride_2": (lambda: decode_view(S((T * HQ * D * 2,), BF16), (T, HQ, D), (HQ * D * 2, D * 2, 2)),
                            r"(?i)stride"),
    "view_offset_out_of_bounds": (lambda: decode_view(S((T * HQ * D,), BF16), (T, HQ, D), (HQ * D, D, 1), 1),
                                  r"(?i)bound|outside|exceed|base"),
    "view_stride_out_of_bounds": (lambda: decode_view(S((T, HQ, D), BF16), (T, HQ, D), (HQ * D + 1, D, 1)),
                                  r"(?i)bound|outside|exceed|base"),
    "view_negative_offset": (lambda: decode_view(S((T, HQ, D), BF16), (T, HQ, D), (HQ * D, D, 1), -1),
                             r"(?i)offset|bound|negative"),
    "view_strides_length": (lambda: decode_view(S((T, HQ, D), BF16), (T, HQ, D), (HQ * D, 1)), r"(?i)stride"),
    "view_rank2": (lambda: decode_view(S((T, HQ * D), BF16), (T, HQ * D), (HQ * D, 1)), r"\bq\b"),
    # --- split_qkv
    "split_width_not_divisible": (lambda: split(S((T, W + 1), BF16)), r"qkv"),
    "split_3d_head_count": (lambda: split(S((T, HQ + 2 * HKV + 1, D), BF16)), r"qkv"),
    "split_2d_head_dim_wrong": (lambda: split(S((T, W), BF16), head_dim=D + 1), r"head_dim|qkv"),
    "split_3d_head_dim_wrong": (lambda: split(S((T, HQ + 2 * HKV, D), BF16), head_dim=2 * D), r"head_dim|qkv"),
    "split_rank1": (lambda: split(S((T * W,), BF16)), r"qkv"),
    # --- paged_prefill
    "cu_seqlens_len": (lambda: prefill(cu=S((B,), I32)), r"cu_seqlens_q"),
    "cu_seqlens_dtype": (lambda: prefill(cu=S((B + 1,), F32)), r"cu_seqlens_q"),
    "cu_seqlens_rank2": (lambda: prefill(cu=S((B + 1, 1), I32)), r"cu_seqlens_q"),
    "max_q_len_zero": (lambda: prefill(max_q_len=0), r"max_q_len"),
    "max_q_len_negative": (lambda: prefill(max_q_len=-3), r"max_q_len"),
    "prefill_sinks_shape": (lambda: prefill(sinks=jnp.zeros((HQ + 1,), F32)), r"sinks"),
    "prefill_head_dim": (lambda: prefill(q=S((T, HQ, D // 2), BF16)), r"head_dim"),
    "prefill_window": (lambda: prefill(window_left=-5), r"window_left"),
    "prefill_seq_lens_batch": (lambda: prefill(sl=S((B - 1,), I32)), r"seq_lens|block_tables"),
    "prefill_block_tables_dtype": (lambda: prefill(bt=S((B, M), F32)), r"block_tables"),
    "prefill_q_fp8": (lambda: prefill(q=S((T, HQ, D), FP8)), r"\bq\b"),
    "prefill_soft_cap": (lambda: prefill(logits_soft_cap=0.0), r"logits_soft_cap"),
    "prefill_out_dtype": (lambda: prefill(out_dtype=jnp.int8), r"out_dtype"),
    # --- append_kv
    "slot_mapping_len": (lambda: append(slots=S((T + 1,), I32)), r"slot_mapping"),
    "slot_mapping_dtype": (lambda: append(slots=S((T,), F32)), r"slot_mapping"),
    "slot_mapping_rank2": (lambda: append(slots=S((T, 1), I32)), r"slot_mapping"),
    "append_k_heads": (lambda: append(k=S((T, HKV + 1, D), BF16), v=S((T, HKV + 1, D), BF16)), r"\bk\b"),
    "append_v_shape": (lambda: append(v=S((T, HKV, D + 1), BF16)), r"\bv\b"),
    "append_head_dim": (lambda: append(k=S((T, HKV, 2 * D), BF16), v=S((T, HKV, 2 * D), BF16)),
                        r"head_dim|\bk\b"),
    "append_k_rank2": (lambda: append(k=S((T, HKV * D), BF16)), r"\bk\b"),
    "append_k_int": (lambda: append(k=S((T, HKV, D), I32), v=S((T, HKV, D), I32)), r"\bk\b"),
    "append_bad_layout": (lambda: append(kv_layout="DHN"), r"kv_layout"),
    "append_v_pages_shape": (lambda: append(v_pages=S((P, PS + 1, HKV, D), BF16)), r"v_pages"),
    "append_combined_axis1": (lambda: append(k_pages=S((P, 1, PS, HKV, D), BF16), v_pages=None), r"k_pages"),
    "append_pages_int": (lambda: append(k_pages=S(KP.shape, I32), v_pages=S(KP.shape, I32)), r"k_pages"),
}


@pytest.mark.parametrize("name", sorted(MISUSES))
def test_static_misuse_raises_at_trace_time(name):
    fn, match = MISUSES[name]
    with pytest.raises((ValueError, TypeError), match=match):
        fn()


@pytest.mark.parametrize("op", ["decode", "prefill", "append"])
def test_the_valid_baseline_traces(op):
    """The baseline every misuse above perturbs is itself valid (so each error is the perturbation's)."""
    if op == "decode":
        out = decode()
        assert out.shape == (T, HQ, D)
        out, lse = decode(return_lse=True, sinks=jnp.zeros((HQ,), F32), window_left=3,
                          logits_soft_cap=5.0, out_dtype=F32, k_scale=0.5)
        assert out.dtype == F32 and lse.shape == (T, HQ)
        assert decode(k=S((P, 2, PS, HKV, D), BF16), v=None).shape == (T, HQ, D)
        assert decode_view(S((2 * T * HQ * D,), BF16), (T, HQ, D), (2 * HQ * D, D, 1), HQ * D).shape == (T, HQ, D)
        assert split(S((T, W), BF16)).shape == (T, HQ, D)
        assert split(S((T, HQ + 2 * HKV, D), BF16), head_dim=D).shape == (T, HQ, D)
    elif op == "prefill":
        assert prefill().shape == (T, HQ, D)
        assert prefill(causal=False, max_q_len=1, kv_layout="HND",
                       k=S((P, HKV, PS, D), BF16), v=S((P, HKV, PS, D), BF16)).shape == (T, HQ, D)
    else:
        kp, vp = append()
        assert kp.shape == KP.shape and vp.shape == KP.shape
        kvp, none = append(k_pages=S((P, 2, PS, HKV, D), BF16), v_pages=None)
        assert kvp.shape == (P, 2, PS, HKV, D) and none is None
