"""Shared test helpers: ``assert_close`` (relative L2 with strict NaN / inf rules) and setup.

Test modules import helpers with ``from conftest import assert_close`` and case generation
with ``import cases``; this directory is put on ``sys.path`` so that works in every pytest
import mode.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import cases  # noqa: E402


def _as_f64(x) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind not in "fc":
        # ml_dtypes (bfloat16, float8) report kind 'V'; go through float32
        x = x.astype(np.float32)
    return x.astype(np.float64)


def rel_l2(actual, expected) -> float:
    """||actual - expected|| / ||expected|| over all elements (0 when both are zero)."""
    a, e = _as_f64(actual), _as_f64(expected)
    num = float(np.linalg.norm((a - e).ravel()))
    den = float(np.linalg.norm(e.ravel()))
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def assert_close(actual, expected, tol=None, *, nan_ok=False, what="out"):
    """Relative-L2 comparison of ``actual`` against a float32 ``expected``.

    * shapes must match; ``tol`` defaults to the tolerance of ``actual``'s dtype
      (float32 1e-5, float16 2e-3, bfloat16 1e-2);
    * NaN never passes: any NaN fails unless ``nan_ok``, and then the NaN positions of
      ``actual`` and ``expected`` must be identical;
    * infinities must match in position and sign exactly (e.g. lse ``-inf`` rows);
    * the remaining finite entries must satisfy rel_l2 <= tol.
    """
    a_raw = np.asarray(actual)
    if tol is None:
        tol = cases.tolerance(a_raw.dtype)
    a, e = _as_f64(a_raw), _as_f64(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    an, en = np.isnan(a), np.isnan(e)
    if nan_ok:
        mism = np.argwhere(an != en)
        assert mism.size == 0, (
            f"{what}: NaN positions differ at {mism[:8].tolist()} "
            f"(actual NaN {int(an.sum())}, expected NaN {int(en.sum())})")
    else:
        assert not an.any(), f"{what}: {int(an.sum())} NaN in actual, first at {np.argwhere(an)[0].tolist()}"
        assert not en.any(), f"{what}: expected holds NaN (test bug)"
    ai, ei = np.isinf(a), np.isinf(e)
    mism = np.argwhere(ai != ei)
    assert mism.size == 0, f"{what}: infinity positions differ at {mism[:8].tolist()}"
    assert np.array_equal(a[ai], e[ei]), f"{what}: infinities differ in sign"
    fin = ~(an | ai | en | ei)
    err = rel_l2(a[fin], e[fin])
    assert err <= tol, f"{what}: relative L2 error {err:.3e} > {tol:.1e}"
    return err


def assert_bitwise(actual, expected, what="out"):
    """Exactly the same dtype, shape and bits (NaN payloads included)."""
    a, e = np.asarray(actual), np.asarray(expected)
    assert a.dtype == e.dtype, f"{what}: dtype {a.dtype} != {e.dtype}"
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    av, ev = a.view(np.uint8), e.view(np.uint8)
    if not np.array_equal(av, ev):
        diff = np.argwhere(a.view(f"u{a.itemsize}") != e.view(f"u{e.itemsize}"))
        raise AssertionError(f"{what}: {len(diff)} elements differ bitwise, first at {diff[:5].tolist()}")


def gpu_device():
    """The first CUDA device, or None (GPU suites skip then). JPA_TEST_GPU_SUITE_ON_CPU=1
    hands them the CPU instead, to check the suites' own logic at small sizes."""
    import jax

    if os.environ.get("JPA_TEST_GPU_SUITE_ON_CPU") == "1":  # harness self-check only
        return jax.devices("cpu")[0]
    try:
        devs = jax.devices("gpu")
    except Exception:  # no CUDA backend / plugin
        return None
    return devs[0] if devs else None


def run_on_fake_cpu_devices(script: str, count: int = 2):
    """Runs `script` in a fresh Python whose CPU platform has `count` devices (so the forced
    device count does not leak into other tests); asserts it exits 0 and prints OK."""
    import subprocess

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={count}")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK" in res.stdout, res.stdout + res.stderr


@pytest.fixture
def on_cpu():
    """Run a test with the CPU as the default device (the CPU suite stays on the CPU FFI path
    even where a GPU is present)."""
    import jax

    with jax.default_device(jax.devices("cpu")[0]):
        yield


@pytest.fixture(scope="session")
def jpa():
    import jax_paged_attn

    return jax_paged_attn


@pytest.fixture(scope="session")
def ref():
    import jax_paged_attn.reference

    return jax_paged_attn.reference


# Cases run by the fuzz suite (tests/test_fuzz.py), printed at the end of the session.
FUZZ_COUNTS = {"configs": 0, "cases": 0, "broken": 0}


def pytest_terminal_summary(terminalreporter):
    if FUZZ_COUNTS["cases"]:
        terminalreporter.write_line(
            f"fuzz: {FUZZ_COUNTS['cases']} cases passed over {FUZZ_COUNTS['configs']} "
            f"configurations ({FUZZ_COUNTS['broken']} with broken metadata)")
