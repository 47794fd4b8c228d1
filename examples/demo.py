"""A short decode + prefill run on the default device: max error against the pure-jnp
reference and the time per call. `make demo` runs it."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_paged_attn as jpa


def _time(fn, *args, reps=10):
    jax.block_until_ready(fn(*args))  # compile + warm up
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps


def main():
    on_gpu = jax.default_backend() == "gpu"
    rng = np.random.default_rng(0)
    dtype = jnp.bfloat16
    hq, hkv, d, page = (32, 8, 128, 16) if on_gpu else (8, 2, 64, 16)
    batch, kv_len = (32, 2048) if on_gpu else (4, 256)
    pages_per_req = kv_len // page
    num_pages = batch * pages_per_req
    k_pages = jnp.asarray(rng.standard_normal((num_pages, page, hkv, d)), dtype)
    v_pages = jnp.asarray(rng.standard_normal((num_pages, page, hkv, d)), dtype)
    block_tables = jnp.asarray(rng.permutation(num_pages).reshape(batch, pages_per_req),
                               jnp.int32)
    seq_lens = jnp.asarray(rng.integers(kv_len // 2, kv_len + 1, batch), jnp.int32)

    # Decode: the query is a strided view into a packed QKV projection (no copy).
    qkv = jnp.asarray(rng.standard_normal((batch, (hq + 2 * hkv) * d)), dtype)
    decode = jax.jit(lambda qkv, kp, vp, bt, sl: jpa.paged_decode(
        jpa.split_qkv(qkv, hq, hkv)[0], kp, vp, bt, sl))
    out = decode(qkv, k_pages, v_pages, block_tables, seq_lens)
    q = jpa.split_qkv(qkv, hq, hkv)[0]
    ref = jpa.reference.paged_decode(q, k_pages, v_pages, block_tables, seq_lens,
                                     out_dtype=jnp.float32)
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
    t = _time(decode, qkv, k_pages, v_pages, block_tables, seq_lens)
    print(f"paged_decode  B={batch} L<={kv_len} Hq={hq} Hkv={hkv} D={d} on "
          f"{jax.default_backend()}: max |err| = {err:.2e}, {t * 1e3:.3f} ms/call")

    # Prefill: ragged query lengths, causal, bottom-right aligned to each request's KV.
    q_lens = np.minimum(rng.integers(1, 65, batch), np.asarray(seq_lens))
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    qp = jnp.asarray(rng.standard_normal((int(q_lens.sum()), hq, d)), dtype)
    prefill = jax.jit(lambda q, kp, vp, bt, sl, cu: jpa.paged_prefill(
        q, kp, vp, bt, sl, cu, max_q_len=64))
    out = prefill(qp, k_pages, v_pages, block_tables, seq_lens, cu)
    ref = jpa.reference.paged_prefill(qp, k_pages, v_pages, block_tables, seq_lens, cu,
                                      max_q_len=64, out_dtype=jnp.float32)
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
    t = _time(prefill, qp, k_pages, v_pages, block_tables, seq_lens, cu)
    print(f"paged_prefill {int(q_lens.sum())} query tokens over {batch} requests: "
          f"max |err| = {err:.2e}, {t * 1e3:.3f} ms/call")


if __name__ == "__main__":
    main()
