"""The CUDA launcher's switches, read from the environment when a call is lowered for the GPU
and carried by its custom call as attributes (ffi_src/ffi/attrs.h).

So an executable keeps the options it was compiled with: later changes of the environment
do not reach it (set a switch before the function's first call, or build a fresh `jax.jit`
for each setting, as the benchmarks do), and a command buffer replays what the call was
lowered with. A value outside the ones below is a ValueError at trace time.

    JPA_CUDA_FAMILY        "" / "auto" / "sm90": the device's default family (sm90 prefill on
                           compute capability 9.0 when the build has it); "sm80": the portable
                           family everywhere
    JPA_CUDA_MIXED         "1": mixed batches get a 16-row-shape launch for their short
                           requests (docs/cuda_kernels.md); "" / "0": off
    JPA_CUDA_TILE_ROWS     benchmarking knob: "64" or "128" force a prefill tile shape
    JPA_CUDA_LONGEST_FIRST benchmarking knob: "0" keeps decode CTAs in batch order
    JPA_CUDA_FUSED_MERGE   experimental: "1" merges split decode in the last split CTA of
                           each (request, KV head) instead of in a merge launch (two earlier
                           versions measured slower on the H200: benchmarks/RESULTS.md, run
                           8); "" / "0": off
    JPA_CUDA_SPLITS        benchmarking knob: "1" .. "64" split each row block's keys into
                           that many KV splits (at most as many as the launcher's cap allows:
                           the workspace, 256 keys of the block table per split, about four
                           waves of CTAs) instead of the launcher's choice (the 16-row part
                           of a JPA_CUDA_MIXED launch keeps its own); "": its choice
"""

from __future__ import annotations

import contextlib
import functools
import os

import numpy as np

# attribute -> (environment variable, {accepted value: attribute value}, or None where
# _values takes them from the extension); "" is unset.
SWITCHES = {
    "launch_family": ("JPA_CUDA_FAMILY", {"": 0, "auto": 0, "sm90": 0, "sm80": 1}),
    "launch_mixed": ("JPA_CUDA_MIXED", {"": 0, "0": 0, "1": 1}),
    "launch_tile_rows": ("JPA_CUDA_TILE_ROWS", {"": 0, "64": 64, "128": 128}),
    "launch_longest_first": ("JPA_CUDA_LONGEST_FIRST", {"": 1, "1": 1, "0": 0}),
    "launch_fused_merge": ("JPA_CUDA_FUSED_MERGE", {"": 0, "0": 0, "1": 1}),
    "launch_splits": ("JPA_CUDA_SPLITS", None),  # "1" .. the extension's max_kv_splits
}


@functools.cache
def _values(attr: str) -> dict:
    """The accepted values of a switch. The split counts come from the extension (the
    launcher's kMaxSplits), not from a copy here."""
    values = SWITCHES[attr][1]
    if values is None:
        from . import _registry
        top = int(_registry.extension().max_kv_splits)
        values = {"": 0, **{str(n): n for n in range(1, top + 1)}}
    return values


def _choices(values) -> str:
    """The accepted values of a switch, for its error message (a run of integers as a range)."""
    named = [v for v in values if v]
    if len(named) > 4 and all(v.isdigit() for v in named):
        return f"'{named[0]}' .. '{named[-1]}'"
    return ", ".join(repr(v) for v in named)


def defaults() -> dict[str, np.int64]:
    """The switches as unset (what the CPU lowering passes; the CPU kernels ignore them)."""
    return {attr: np.int64(_values(attr)[""]) for attr in SWITCHES}


def from_environment() -> dict[str, np.int64]:
    """The switches as the environment sets them now (called by the CUDA lowering)."""
    out = {}
    for attr, (var, _) in SWITCHES.items():
        values = _values(attr)
        raw = os.environ.get(var, "").strip()
        if raw not in values:
            choices = _choices(values)
            raise ValueError(f"jax_paged_attn: {var}={raw!r} is not one of {choices} "
                             "(or unset)")
        out[attr] = np.int64(values[raw])
    return out


@contextlib.contextmanager
def switched(env: dict[str, str]):
    """Sets the switches in `env` (variable -> value) for the block and restores the
    environment after it. Calls lowered inside the block keep the settings (an executable
    or command buffer captures them when it is compiled), so build the jitted function and
    run it for the first time inside the block."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
