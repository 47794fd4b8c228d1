"""The CUDA kernels' shape limits (ffi_src/common/gpu_limits.h) are raised while lowering for
the GPU, at trace time, with the reason: not a launch error when the call runs. Lowered for
CUDA on any machine from abstract shapes (nothing is allocated); the CPU path has no limit."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

import jax_paged_attn as jpa
from jax_paged_attn import _registry

limit = _registry.extension().gpu_shape_limit
S = jax.ShapeDtypeStruct
MAX_KEYS = 2**31 - 2**16


def _prefill_text(platform, *, t, hq=8, hkv=1, batch=1, pages_per_req=4, page=16,
                  max_q_len=1, d=64):
    q = S((t, hq, d), jnp.bfloat16)
    kp = S((8, page, hkv, d), jnp.bfloat16)
    bt = S((batch, pages_per_req), jnp.int32)
    sl = S((batch,), jnp.int32)
    cu = S((batch + 1,), jnp.int32)
    f = jax.jit(lambda *a: jpa.paged_prefill(*a, max_q_len=max_q_len))
    return f.trace(q, kp, kp, bt, sl, cu).lower(lowering_platforms=(platform,)).as_text()


def _decode_text(platform, *, batch):
    q = S((batch, 8, 64), jnp.bfloat16)
    kp = S((8, 16, 1, 64), jnp.bfloat16)
    bt = S((batch, 4), jnp.int32)
    sl = S((batch,), jnp.int32)
    return jax.jit(jpa.paged_decode).trace(q, kp, kp, bt, sl).lower(
        lowering_platforms=(platform,)).as_text()


# (keyword arguments, the message's start) per limit, each one step past it; AT_LIMIT the same
# shapes on the limit itself.
PAST = {
    "rows": (dict(t=2**28, hq=8), "num_tokens * num_q_heads"),
    "capacity": (dict(t=4, pages_per_req=MAX_KEYS // 16 + 1), "the block table's capacity"),
    # 8 rows a token: 65535 blocks of 128 rows hold 65535 * 16 tokens (of 64 at D=256)
    "row_blocks": (dict(t=65535 * 16 + 1, max_q_len=65535 * 16 + 1),
                   "max_q_len * (num_q_heads / num_kv_heads)"),
    "row_blocks_d256": (dict(t=65535 * 8 + 1, max_q_len=65535 * 8 + 1, d=256),
                        "max_q_len * (num_q_heads / num_kv_heads)"),
}
AT_LIMIT = {
    "rows": dict(t=2**28 - 1, hq=8),
    "capacity": dict(t=4, pages_per_req=MAX_KEYS // 16),
    "row_blocks": dict(t=65535 * 16, max_q_len=65535 * 16),
    "row_blocks_d256": dict(t=65535 * 8, max_q_len=65535 * 8, d=256),
}


@pytest.mark.parametrize("which", sorted(PAST))
def test_prefill_past_a_limit_raises_at_trace_time_for_the_gpu(which):
    kwargs, why = PAST[which]
    with pytest.raises(ValueError, match="jax_paged_attn: " + re.escape(why)):
        _prefill_text("cuda", **kwargs)
    assert "custom_call @jpa_paged_prefill" in _prefill_text("cuda", **AT_LIMIT[which])
    # the CPU kernels index in int64: no limit there
    assert "custom_call @jpa_paged_prefill" in _prefill_text("cpu", **kwargs)


def test_decode_batch_past_65535_raises_at_trace_time_for_the_gpu():
    with pytest.raises(ValueError, match="batch .* at most 65535"):
        _decode_text("cuda", batch=65536)
    assert "custom_call @jpa_paged_decode" in _decode_text("cuda", batch=65535)


def test_extension_function_names_each_limit():
    ok = dict(num_tokens=8, num_q_heads=32, group=4, head_dim=128, batch=8,
              max_pages_per_req=64, page_size=16, max_q_len=1)
    assert limit(**ok) == ""
    for change, words in [(dict(num_tokens=2**26), "num_tokens * num_q_heads"),
                          (dict(batch=65536), "batch"),
                          (dict(page_size=2**31), "page_size"),
                          (dict(max_q_len=2**31), "max_q_len must be below"),
                          (dict(max_pages_per_req=2**27), "capacity"),
                          (dict(max_q_len=2**21 + 1, group=4), "65535 row blocks"),
                          (dict(max_q_len=2**20 + 1, group=4, head_dim=256),
                           "65535 row blocks")]:
        assert words in limit(**{**ok, **change}), change
    # on the limit itself: 65535 blocks of 128 rows (64 at D=256)
    assert limit(**{**ok, "max_q_len": 65535 * 32, "group": 4}) == ""
    assert limit(**{**ok, "max_q_len": 65535 * 16, "group": 4, "head_dim": 256}) == ""
