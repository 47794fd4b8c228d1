"""A small representative set of CUDA calls for compute-sanitizer (memcheck / racecheck).

Covers: decode with split-KV (merge kernel), decode with many rows per KV head (prefill tile
shape), prefill with padding rows, q_len 0 requests and invalid metadata, fp8 pages, HND and
combined layouts, head_dims 64 / 128 / 256, page size 5 (division path), and append_kv.
Run it under the sanitizer with XLA_PYTHON_CLIENT_PREALLOCATE=false. Prints one line per
call and "sanitizer_cases: done" at the end.
"""

from __future__ import annotations

import os
import sys

import numpy as np

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "tests")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import cases  # noqa: E402
import jax_paged_attn as jpa  # noqa: E402

GPU = jax.devices("cpu" if os.environ.get("JPA_SANITIZER_CASES_ON_CPU") == "1" else "gpu")[0]


def put(x):
    return jax.device_put(x, GPU) if isinstance(x, np.ndarray) else x


def run_attention(case, mutate=None):
    inp = cases.make_inputs(case)
    args = [put(a) for a in inp.args]
    if mutate is not None:
        bt, sl = np.array(inp.block_tables), np.array(inp.seq_lens)
        mutate(bt, sl)
        args[3], args[4] = put(bt), put(sl)
    kw = {k: put(v) for k, v in inp.kwargs.items()}
    fn = jpa.paged_decode if case.kind == "decode" else jpa.paged_prefill
    res = fn(*args, **kw)
    res = res if isinstance(res, tuple) else (res,)
    out = np.asarray(res[0]).astype(np.float32)
    print(f"{case.kind:8s} D={case.head_dim:3d} ps={case.page_size:2d} {case.kv_dtype:4s} "
          f"{case.kv_layout}{' comb' if case.combined else ''}: out finite rows "
          f"{int(np.isfinite(out).reshape(out.shape[0], -1).all(1).sum())}/{out.shape[0]}",
          flush=True)


def main():
    A = cases.AttnCase
    # decode, long enough for several KV splits (merge kernel), GQA 4
    run_attention(A(kind="decode", batch=2, num_kv_heads=2, group=4, head_dim=128,
                    page_size=16, q_dtype="bf16", kv_dtype="bf16", max_kv_len=1500, seed=1))
    # decode with invalid metadata (page index out of range, seq_len past capacity)
    def bad_decode(bt, sl):
        bt[1, 0] = 10**6
        sl[2] = bt.shape[1] * 5 + 3
    run_attention(A(kind="decode", batch=4, num_kv_heads=2, group=2, head_dim=64,
                    page_size=5, q_dtype="f16", kv_dtype="f16", max_kv_len=300, seed=2),
                  mutate=bad_decode)
    # decode, 32 rows per KV head (prefill tile shape), fp8 HND combined, window + sinks
    run_attention(A(kind="decode", batch=3, num_kv_heads=1, group=8, head_dim=256,
                    page_size=16, q_dtype="bf16", kv_dtype="fp8", kv_layout="HND",
                    combined=True, k_scale=0.5, v_scale=1.5, q_len_per_req=4,
                    window_left=40, sinks=True, max_kv_len=400, seed=3))
    # prefill: padding, q_len 0 requests, softcap, non-causal, fp8
    run_attention(A(kind="prefill", batch=5, num_kv_heads=2, group=4, head_dim=128,
                    page_size=16, q_dtype="bf16", kv_dtype="bf16", max_q_len=70,
                    max_kv_len=200, zero_q_lens=True, pad_front=3, pad_back=5,
                    logits_soft_cap=10.0, seed=4))
    run_attention(A(kind="prefill", batch=3, num_kv_heads=2, group=2, head_dim=64,
                    page_size=5, q_dtype="f16", kv_dtype="fp8", k_scale=0.7, v_scale=0.9,
                    causal=False, window_left=9, max_q_len=40, max_kv_len=120, seed=5))
    # prefill with invalid metadata and a long KV (splits in prefill)
    def bad_prefill(bt, sl):
        sl[0] = 0  # seq_len < q_len
    run_attention(A(kind="prefill", batch=2, num_kv_heads=2, group=4, head_dim=256,
                    page_size=16, q_dtype="bf16", kv_dtype="bf16", max_q_len=6,
                    max_kv_len=2000, seed=6), mutate=bad_prefill)
    # append (strided source, fp8 and bf16 pages)
    for ac in (cases.AppendCase(new_dtype="bf16", kv_dtype="bf16", head_dim=128,
                                skip_fraction=0.3, seed=7),
               cases.AppendCase(new_dtype="f32", kv_dtype="fp8", head_dim=64, combined=True,
                                kv_layout="HND", k_scale=0.4, v_scale=2.0, seed=8),
               cases.AppendCase(new_dtype="f32", kv_dtype="f16", head_dim=12, seed=9)):
        (kp, vp, k, v, slots), kw = cases.make_append_inputs(ac)
        out = jpa.append_kv(put(kp), None if vp is None else put(vp), put(k), put(v),
                            put(slots), **kw)
        jax.block_until_ready(out)
        print(f"append  D={ac.head_dim:3d} {ac.kv_dtype}: ok", flush=True)
    print("sanitizer_cases: done", flush=True)


if __name__ == "__main__":
    main()
