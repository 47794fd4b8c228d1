"""The CUDA launcher's switches (jax_paged_attn/launch_options.py) are read when a call is
lowered for the GPU and travel as custom-call attributes; the CPU lowering passes the unset
values; a bad value is an error at trace time. Lowered for CUDA from abstract shapes, so this
runs on any machine."""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import pytest

import jax_paged_attn as jpa
from jax_paged_attn import launch_options

S = jax.ShapeDtypeStruct
ENV_VARS = [var for var, _ in launch_options.SWITCHES.values()]


@pytest.fixture(autouse=True)
def _unset(monkeypatch):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)


def _lowered(platform, op="prefill"):
    q = S((4, 8, 64), jnp.bfloat16)
    kp = S((8, 16, 2, 64), jnp.bfloat16)
    bt = S((2, 4), jnp.int32)
    sl = S((2,), jnp.int32)
    if op == "decode":
        f, args = jax.jit(lambda *a: jpa.paged_decode(*a, q_len_per_req=2)), (q, kp, kp, bt, sl)
    else:
        cu = S((3,), jnp.int32)
        f, args = jax.jit(lambda *a: jpa.paged_prefill(*a, max_q_len=2)), (q, kp, kp, bt, sl, cu)
    text = f.trace(*args).lower(lowering_platforms=(platform,)).as_text()
    return next(line for line in text.splitlines() if f"custom_call @jpa_paged_{op}" in line)


def _switches(line):
    return {k: int(v) for k, v in re.findall(r"(launch_\w+) = (-?\d+) : i64", line)}


@pytest.mark.parametrize("op", ["decode", "prefill"])
def test_unset_switches_lower_as_the_defaults(op):
    want = {k: int(v) for k, v in launch_options.defaults().items()}
    assert want == {"launch_family": 0, "launch_mixed": 0, "launch_tile_rows": 0,
                    "launch_longest_first": 1, "launch_fused_merge": 0, "launch_splits": 0}
    assert _switches(_lowered("cuda", op)) == want
    assert _switches(_lowered("cpu", op)) == want


def test_the_environment_at_lowering_sets_the_cuda_attributes(monkeypatch):
    monkeypatch.setenv("JPA_CUDA_FAMILY", "sm80")
    monkeypatch.setenv("JPA_CUDA_MIXED", "1")
    monkeypatch.setenv("JPA_CUDA_TILE_ROWS", "64")
    monkeypatch.setenv("JPA_CUDA_LONGEST_FIRST", "0")
    monkeypatch.setenv("JPA_CUDA_FUSED_MERGE", "1")
    monkeypatch.setenv("JPA_CUDA_SPLITS", "12")
    assert _switches(_lowered("cuda")) == {"launch_family": 1, "launch_mixed": 1,
                                            "launch_tile_rows": 64, "launch_longest_first": 0,
                                            "launch_fused_merge": 1, "launch_splits": 12}
    # the CPU kernels ignore the switches: their lowering does not read them
    assert _switches(_lowered("cpu"))["launch_family"] == 0


@pytest.mark.parametrize("var,value", [("JPA_CUDA_FAMILY", "sm70"), ("JPA_CUDA_MIXED", "yes"),
                                       ("JPA_CUDA_TILE_ROWS", "32"),
                                       ("JPA_CUDA_LONGEST_FIRST", "2"),
                                       ("JPA_CUDA_FUSED_MERGE", "no"),
                                       ("JPA_CUDA_SPLITS", "0"), ("JPA_CUDA_SPLITS", "65")])
def test_a_bad_value_is_a_trace_time_error_naming_the_variable(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=f"{var}='{value}' is not one of"):
        _lowered("cuda")
    _lowered("cpu")  # not read there


def test_switched_sets_the_variables_for_the_block_and_restores_them(monkeypatch):
    monkeypatch.setenv("JPA_CUDA_MIXED", "0")
    monkeypatch.delenv("JPA_CUDA_FUSED_MERGE", raising=False)
    with launch_options.switched({"JPA_CUDA_MIXED": "1", "JPA_CUDA_FUSED_MERGE": "1"}):
        assert _switches(_lowered("cuda"))["launch_mixed"] == 1
        assert launch_options.from_environment()["launch_fused_merge"] == 1
    assert os.environ["JPA_CUDA_MIXED"] == "0"
    assert "JPA_CUDA_FUSED_MERGE" not in os.environ
    with pytest.raises(RuntimeError):  # restored on an exception too
        with launch_options.switched({"JPA_CUDA_MIXED": "1"}):
            raise RuntimeError
    assert os.environ["JPA_CUDA_MIXED"] == "0"


def test_the_split_count_error_names_its_range(monkeypatch):
    monkeypatch.setenv("JPA_CUDA_SPLITS", "x")
    with pytest.raises(ValueError, match=r"JPA_CUDA_SPLITS='x' is not one of '1' \.\. '64'"):
        _lowered("cuda", "decode")
