"""Loads the compiled extension and registers its FFI handlers with XLA, once."""

from __future__ import annotations

import functools
import importlib.metadata
import os

from . import compat

TARGETS = ("jpa_paged_decode", "jpa_paged_prefill", "jpa_append_kv")


# Custom calls a `jax.export` of our ops contains: the three kernels, and XLA's
# "LayoutConstraint" that a stacked append_kv emits (docs/semantics.md, "Stacked caches").
EXPORTED_CUSTOM_CALLS = TARGETS + ("LayoutConstraint",)


def _missing_extension_message() -> str:
    """Why `_jpa_ffi` did not import, in the words a user needs."""
    here = os.path.dirname(os.path.abspath(__file__))
    in_source_tree = os.path.exists(os.path.join(here, "..", "pyproject.toml"))
    try:
        installed = importlib.metadata.distribution("jax_paged_attn")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if in_source_tree and installed is not None:
        return (f"jax_paged_attn: this Python imported the source tree at {here}, which has "
                "no compiled extension, instead of the installed package: the source tree "
                "is shadowing it (the current directory or PYTHONPATH puts it first). Run "
                "from another directory, or install in place with `pip install "
                "--no-build-isolation -e .` (the README's `make build` does that).")
    return ("jax_paged_attn: the compiled extension _jpa_ffi is missing; build the package "
            "with `pip install --no-build-isolation .` (see README)")


@functools.lru_cache(maxsize=None)
def extension():
    try:
        from . import _jpa_ffi
    except ImportError as e:  # pragma: no cover - depends on the build
        raise ImportError(_missing_extension_message()) from e
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


def cuda_kernel_families() -> list[str]:
    """The CUDA kernel families this build holds: [] (CPU-only build), ["sm80"], or
    ["sm80", "sm90"] (Hopper wgmma prefill: the default for 16-bit-page prefill on compute
    capability 9.0; JPA_CUDA_FAMILY=sm80 forces sm80)."""
    return list(extension().cuda_kernel_families())


def register_if_built() -> bool:
    """Registers the handlers when the extension exists (at import, so that a deserialized
    `jax.export` finds them); without it the reference still works and the ops raise."""
    try:
        register()
    except ImportError:
        return False
    return True
