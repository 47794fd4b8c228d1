"""Runs one decode per benchmark point named on the command line (for ncu: profile the
attention kernels of a few points). Points: fp8, d64, b1, grid (B=32 L=4096 bf16)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import jax  # noqa: E402

import common as C  # noqa: E402
import jax_paged_attn as jpa  # noqa: E402

POINTS = {"fp8": dict(batch=128, max_len=2048, d=128, kv="fp8"),
          "d64": dict(batch=32, max_len=4096, d=64, kv="bf16"),
          "b1": dict(batch=1, max_len=32768, d=128, kv="bf16"),
          "grid": dict(batch=32, max_len=4096, d=128, kv="bf16")}

for name in sys.argv[1:]:
    pt = POINTS[name]
    key = jax.random.PRNGKey(0)
    cache = C.make_paged_cache(key, batch=pt["batch"], max_len=pt["max_len"], num_kv_heads=8,
                               head_dim=pt["d"], page_size=16,
                               dtype=pt["kv"])
    q = C.random_array(jax.random.fold_in(key, 1), (pt["batch"], 32, pt["d"]))
    f = jax.jit(lambda q, k, v, bt, sl: jpa.paged_decode(q, k, v, bt, sl))
    jax.block_until_ready(f(q, cache.k, cache.v, cache.block_tables, cache.seq_lens))
    print("ran", name, flush=True)
