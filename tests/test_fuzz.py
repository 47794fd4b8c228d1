"""Property-based fuzzing of the CPU FFI path against the reference (generator: fuzz.py).

JPA_FUZZ_CONFIGS static configurations x JPA_FUZZ_DRAWS runtime draws each (defaults 64 x 16
= 1,024 cases), derandomized: config seeds start at JPA_FUZZ_SEED (default 0). A failure
names its `fuzz case config=C draw=D`; rerun that one with
`JPA_FUZZ_SEED=C JPA_FUZZ_CONFIGS=1 pytest tests/test_fuzz.py` or `scripts/gpu_fuzz.py
--repro C:D --cpu`. The number of cases run is printed at the end of the session.
"""

from __future__ import annotations

import os

import jax
import pytest

import fuzz
import jax_paged_attn as jpa
from conftest import FUZZ_COUNTS, assert_close
from jax_paged_attn import reference as ref

pytestmark = pytest.mark.usefixtures("on_cpu")

SEED = int(os.environ.get("JPA_FUZZ_SEED", "0"))
CONFIGS = int(os.environ.get("JPA_FUZZ_CONFIGS", "64"))
DRAWS = int(os.environ.get("JPA_FUZZ_DRAWS", "16"))

OPS = {"decode": (jpa.paged_decode, ref.paged_decode),
       "prefill": (jpa.paged_prefill, ref.paged_prefill)}


def _put(x):
    import numpy as np
    return jax.numpy.asarray(x) if isinstance(x, (np.ndarray, np.generic)) else x


@pytest.mark.parametrize("config_seed", range(SEED, SEED + CONFIGS))
def test_fuzz_against_reference(config_seed):
    for draw in range(DRAWS):
        case = fuzz.draw_case(config_seed, draw)
        ours, oracle = OPS[case.config.case.kind]
        out, lse = fuzz.run(case, ours, jpa, _put)
        r_out, r_lse = fuzz.run(case, oracle, jpa, _put, float32_oracle=True)
        fuzz.check(case, out, lse, r_out, r_lse, assert_close)
        FUZZ_COUNTS["cases"] += 1
        FUZZ_COUNTS["broken"] += bool(case.broken)
    FUZZ_COUNTS["configs"] += 1
