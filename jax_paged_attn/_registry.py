"""Loads the compiled extension and registers its FFI handlers with XLA, once."""

from __future__ import annotations

import functools

from . import compat

TARGETS = ("jpa_paged_decode", "jpa_paged_prefill", "jpa_append_kv")


@functools.lru_cache(maxsize=None)
def extension():
    try:
        from . import _jpa_ffi
    except ImportError as e:  # pragma: no cover - depends on the build
        raise ImportError(
            "jax_paged_attn: the compiled extension _jpa_ffi is missing; build the package "
            "with `pip install --no-build-isolation .` (see README)") from e
    return _jpa_ffi


@functools.lru_cache(maxsize=None)
def register() -> tuple[bool, bool]:
    """Registers the CPU (always) and CUDA (when compiled) handlers; returns (cpu, cuda)."""
    ext = extension()
    for name, capsule in ext.cpu_targets().items():
        compat.register_ffi_target(name, capsule, platform="cpu")
    cuda = ext.cuda_targets()
    for name, capsule in cuda.items():
        # Upper-case platform name: lower case never reaches the CUDA plugin.
        compat.register_ffi_target(name, capsule, platform="CUDA")
    return True, bool(cuda)


def has_cuda_kernels() -> bool:
    return register()[1]
