"""Every difference between the jax versions we support (0.10 on Python 3.11, 0.11+ on 3.12).

Other modules import JAX internals only through here.
"""

from __future__ import annotations

import warnings

import jax
from jax.interpreters import ad, batching, mlir  # noqa: F401  (re-exported)

from jax.extend.core import Primitive  # noqa: F401  (jax >= 0.4.36, stable in 0.10/0.11)

JAX_VERSION = tuple(int(x) for x in jax.__version__.split(".")[:3] if x.isdigit())

# ShapedArray: `jax.core.ShapedArray` is deprecated from 0.10 on and may disappear; the
# private home has held it through every version we support.
try:
    from jax._src.core import ShapedArray  # noqa: F401
except ImportError:  # pragma: no cover - future layout
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.core import ShapedArray  # noqa: F401

# Eager application of a primitive (compiles it like a one-op jit); no public home yet.
from jax._src.dispatch import apply_primitive  # noqa: F401

ffi_lowering = jax.ffi.ffi_lowering
register_ffi_target = jax.ffi.register_ffi_target


def replace_avals_out(ctx, avals_out):
    """A lowering context whose results are `avals_out` (to add a hidden workspace output)."""
    return ctx.replace(avals_out=list(avals_out))


def pin_row_major(ctx, value, aval):
    """`value` behind XLA's "LayoutConstraint" custom call (what jax's with_layout_constraint
    emits): layout assignment gives it a row-major layout, adding a copy only when the
    producer's layout differs, and then removes the op."""
    one = ctx.replace(avals_in=[aval], avals_out=[aval])
    return ffi_lowering("LayoutConstraint", api_version=1)(one, value)[0]


def gpu_available() -> bool:
    try:
        return len(jax.devices("gpu")) > 0
    except RuntimeError:
        return False

# Batch dimension of an unbatched operand in a batching rule.
NOT_MAPPED = getattr(batching, "not_mapped", None)

# shard_map: public as `jax.shard_map` from 0.7 on; older homes kept for completeness.
shard_map = getattr(jax, "shard_map", None)
if shard_map is None:  # pragma: no cover - older jax
    from jax.experimental.shard_map import shard_map  # noqa: F401
