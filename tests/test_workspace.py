"""The CUDA attention workspace: its size comes from the extension (ffi_src/common/
workspace.h, the launcher's own policy), reaches the custom call as a hidden uint8 output,
and follows the split-KV policy's limits."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

import jax_paged_attn as jpa
from jax_paged_attn import _registry

ws_bytes = _registry.extension().attention_workspace_bytes
META = 16  # bytes of ReqMeta per request


def _align(x):
    return -(-x // 256) * 256


def _partials(s, rows, d):
    return 0 if s <= 1 else _align(s * rows * 4) + _align(s * rows * d * 4)


def _split(s, rows, d, batch, hkv):
    # with splits: the fused merge's arrival counts (int32 per request and KV head), then
    # the partial lse and outputs
    return 0 if s <= 1 else _align(batch * hkv * 4) + _partials(s, rows, d)


def test_no_splits_possible_means_request_metadata_only():
    # capacity below 2 x 256 keys: one split; a batch filling 2048 CTAs: one split
    assert ws_bytes(num_tokens=4, num_q_heads=8, num_kv_heads=2, head_dim=128, batch=4,
                    max_pages_per_req=31, page_size=16, max_q_len=1) == _align(4 * META)
    assert ws_bytes(num_tokens=512, num_q_heads=32, num_kv_heads=8, head_dim=128, batch=512,
                    max_pages_per_req=512, page_size=16, max_q_len=1) == _align(512 * META)
    assert ws_bytes(num_tokens=0, num_q_heads=8, num_kv_heads=2, head_dim=64, batch=0,
                    max_pages_per_req=4, page_size=16, max_q_len=1) == 256   # never zero


def test_long_single_request_reserves_the_most_splits():
    # B=1 decode, 8 KV heads: 8 CTAs, so ceil(2048 / 8) = 256 splits wanted, capped at 64
    # (and by 32768 / 256 = 128 keys-per-split): 64 splits of [T*Hq] lse and [T*Hq*D] out.
    got = ws_bytes(num_tokens=1, num_q_heads=32, num_kv_heads=8, head_dim=128, batch=1,
                   max_pages_per_req=2048, page_size=16, max_q_len=1)
    assert got == _align(META) + _split(64, 32, 128, 1, 8)
    # keys cap the splits: 1024 keys / 256 = 4
    got = ws_bytes(num_tokens=1, num_q_heads=32, num_kv_heads=8, head_dim=128, batch=1,
                   max_pages_per_req=64, page_size=16, max_q_len=1)
    assert got == _align(META) + _split(4, 32, 128, 1, 8)


def test_partials_never_take_more_than_512_mib():
    # 64 splits wanted; each takes ~67 MB of partials for 1024 x 64 rows of D=256, so the
    # count drops to the most that fit in 512 MiB.
    rows, d = 1024 * 64, 256
    got = ws_bytes(num_tokens=1024, num_q_heads=64, num_kv_heads=8, head_dim=d, batch=1,
                   max_pages_per_req=4096, page_size=16, max_q_len=1)
    fits = max(s for s in range(2, 65) if _partials(s, rows, d) <= 512 << 20)
    assert got == _align(META) + _split(fits, rows, d, 1, 8)


@pytest.mark.parametrize("op", ["decode", "prefill"])
def test_cuda_lowering_carries_the_extensions_size(op):
    T, hq, hkv, d, P, ps, M = 2, 16, 4, 64, 40, 16, 64
    q = jax.ShapeDtypeStruct((T, hq, d), jnp.bfloat16)
    kp = jax.ShapeDtypeStruct((P, ps, hkv, d), jnp.bfloat16)
    bt = jax.ShapeDtypeStruct((T, M), jnp.int32)
    sl = jax.ShapeDtypeStruct((T,), jnp.int32)
    if op == "decode":
        f, args, mq = jpa.paged_decode, (q, kp, kp, bt, sl), 1
    else:
        cu = jax.ShapeDtypeStruct((T + 1,), jnp.int32)
        f, args, mq = (lambda *a: jpa.paged_prefill(*a, max_q_len=1)), (q, kp, kp, bt, sl, cu), 1
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    line = next(l for l in text.splitlines() if f"custom_call @jpa_paged_{op}" in l)
    sizes = re.findall(r"tensor<(\d+)xui8>", line.split("->")[-1])
    want = ws_bytes(num_tokens=T, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, batch=T,
                    max_pages_per_req=M, page_size=ps, max_q_len=mq)
    assert sizes == [str(want)], line
    assert want > _align(T * META)          # this shape does split


def test_the_mixed_split_launch_reserves_its_own_region():
    # A prefill call lowered with JPA_CUDA_MIXED=1: the short requests' 16-row launch gets
    # its own splits (as decode would: 9 requests x 8 KV heads = 72 CTAs, so ceil(2048 / 72)
    # = 29 splits, under the 64 cap and 8192 / 256 keys) and region: arrival counts, then
    # partials of 16 packed rows per (request, KV head).
    kw = dict(num_tokens=600, num_q_heads=32, num_kv_heads=8, head_dim=128, batch=9,
              max_pages_per_req=512, page_size=16, max_q_len=512)
    plain = ws_bytes(**kw)
    assert ws_bytes(**kw, mixed_split=True) - plain == _split(29, 9 * 8 * 16, 128, 9, 8)
    # no region where there is no second launch: every request fits the 16-row shape, or a
    # group of 32 query heads does not
    assert ws_bytes(**{**kw, "max_q_len": 4}, mixed_split=True) == ws_bytes(**{**kw, "max_q_len": 4})
    g32 = {**kw, "num_q_heads": 256}
    assert ws_bytes(**g32, mixed_split=True) == ws_bytes(**g32)


def test_the_cuda_lowering_sizes_the_mixed_region_by_the_switch(monkeypatch):
    T, hq, hkv, d, P, ps, M, B = 40, 16, 4, 64, 90, 16, 64, 5
    q = jax.ShapeDtypeStruct((T, hq, d), jnp.bfloat16)
    kp = jax.ShapeDtypeStruct((P, ps, hkv, d), jnp.bfloat16)
    args = (q, kp, kp, jax.ShapeDtypeStruct((B, M), jnp.int32),
            jax.ShapeDtypeStruct((B,), jnp.int32), jax.ShapeDtypeStruct((B + 1,), jnp.int32))
    kw = dict(num_tokens=T, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, batch=B,
              max_pages_per_req=M, page_size=ps, max_q_len=32)
    for value, mixed in (("", False), ("1", True)):
        monkeypatch.setenv("JPA_CUDA_MIXED", value)
        text = jax.jit(lambda *a: jpa.paged_prefill(*a, max_q_len=32)).trace(*args).lower(
            lowering_platforms=("cuda",)).as_text()
        line = next(l for l in text.splitlines() if "custom_call @jpa_paged_prefill" in l)
        sizes = re.findall(r"tensor<(\d+)xui8>", line.split("->")[-1])
        assert sizes == [str(ws_bytes(**kw, mixed_split=mixed))], line
    assert ws_bytes(**kw, mixed_split=True) > ws_bytes(**kw)
