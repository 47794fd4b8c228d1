"""Runs one decode per benchmark point named on the command line (for ncu: profile the
attention kernels of a few points). Points: fp8, d64, b1, grid (B=32 L=4096 bf16)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import jax  # noqa: E402

import common as C  # noqa: E402

C.add_tests_to_path()
import device_inputs as DI  # noqa: E402
import jax_paged_attn as jpa  # noqa: E402

POINTS = {"fp8": dict(batch=128, max_len=2048, d=128, kv="fp8"),
          "d64": dict(batch=32, max_len=4096, d=64, kv="bf16"),
          "b1": dict(batch=1, max_len=32768, d=128, kv="bf16"),
          "grid": dict(batch=32, max_len=4096, d=128, kv="bf16")}

for name in sys.argv[1:]:
    pt = POINTS[name]
    kc, kq = jax.random.split(jax.random.key(0))
    cache = DI.make_paged_cache(kc, batch=pt["batch"], max_len=pt["max_len"], num_kv_heads=8,
                                head_dim=pt["d"], page_size=16, dtype=pt["kv"])
    q = DI.random_normal(kq, (pt["batch"], 32, pt["d"]), "bf16")
    f = jax.jit(lambda q, k, v, bt, sl: jpa.paged_decode(q, k, v, bt, sl))
    jax.block_until_ready(f(q, cache.k, cache.v, cache.block_tables, cache.seq_lens))
    print("ran", name, flush=True)
