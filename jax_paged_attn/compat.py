"""Every difference between the jax versions we support, and every use of a JAX internal.

Supported and tested in CI: jax 0.10.x on Python 3.11 (`make test`) and the newest jax on
Python 3.12 (`make test-py312`; jax 0.12.0.1 when this was written: the whole CPU suite
passes, also with DeprecationWarning and FutureWarning as errors). jax 0.11.2 on Python 3.12
was checked by hand on the jax-facing tests (test_jax_integration, test_sharding, test_misuse,
test_layers). Other modules, tests included, import JAX internals only through here.

What each name below is, and what differs between versions:

* `Primitive` from `jax.extend.core`: public since jax 0.4.36, the same in 0.10 - 0.12.
* `ShapedArray` from the public `jax.core`: there in 0.10.2 - 0.12.0.1 and not deprecated
  (it is not in jax.core's `_deprecations`, which removed or deprecates other names in 0.10).
  The private `jax._src.core` home is the fallback should the public one go.
* `apply_primitive` (eager application of a primitive, compiled like a one-op jit) is private
  in every version (`jax._src.dispatch`, 0.10 - 0.12). Should it move, a plain jit of
  `prim.bind` does the same work (retraced on each eager call: slower, never wrong).
* `ffi_lowering`, `register_ffi_target`: `jax.ffi`, public and the same in 0.10 - 0.12.
* `ad`, `batching`, `mlir` from `jax.interpreters`: public; only the rule tables
  (`primitive_jvps`, `primitive_batchers`, `register_lowering`) and the lowering context's
  `replace` (a dataclass replace in 0.10 - 0.12) are used.
* `NOT_MAPPED`: the batch dimension of an unbatched operand in a batching rule. jax passes
  None; old jax spelled it `batching.not_mapped` (None too), which 0.10 and 0.12 no longer
  have, so this is None there.
* `varying_axes`: results of our primitives inside `shard_map` vary over the mesh axes their
  operands vary over (`ShapedArray(..., manual_axis_type=...)`, private, 0.10.2 - 0.12.0.1).
* `shard_map` is `jax.shard_map` in every supported version (the tests use it directly; the
  deprecated `jax.experimental.shard_map` is not used).
"""

from __future__ import annotations

import jax
from jax.interpreters import ad, batching, mlir  # noqa: F401  (re-exported)

from jax.extend.core import Primitive  # noqa: F401

# "0.12.0.1" -> (0, 12, 0): the release triple, for messages and version checks.
JAX_VERSION = tuple(int(x) for x in jax.__version__.split(".")[:3] if x.isdigit())

try:
    from jax.core import ShapedArray  # noqa: F401
except ImportError:  # pragma: no cover - not seen in any supported version
    from jax._src.core import ShapedArray  # noqa: F401


try:
    from jax._src.core import ManualAxisType as _ManualAxisType
except ImportError:  # pragma: no cover - not seen in any supported version
    _ManualAxisType = None


def varying_axes(*avals) -> dict:
    """ShapedArray keywords for a result of our primitives inside `shard_map`: it varies
    over every mesh axis any operand varies over (without it a result, e.g. a cache carried
    through a scan, loses its operand's type and shard_map's check rejects the carry).
    `manual_axis_type` (with `.varying`) is private; it is the same in jax 0.10.2 - 0.12.0.1.
    Outside shard_map, or should it move, this is {} (the plain ShapedArray)."""
    if _ManualAxisType is None:
        return {}
    varying, mesh = frozenset(), None
    for a in avals:
        v = getattr(getattr(a, "manual_axis_type", None), "varying", frozenset())
        if v and mesh is None:
            mesh = a.sharding.mesh  # the (abstract) mesh the manual axes belong to
        varying |= v
    if not varying:
        return {}
    # A manual axis type needs a sharding on that mesh; nothing is sharded inside shard_map
    # (the spec is padded to the result's rank).
    return {"sharding": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
            "manual_axis_type": _ManualAxisType(varying=varying)}


def _apply_primitive_via_jit(prim, *args, **params):
    """Fallback for `jax._src.dispatch.apply_primitive`: the primitive alone under jit."""
    return jax.jit(lambda *xs: prim.bind(*xs, **params))(*args)


try:
    from jax._src.dispatch import apply_primitive  # noqa: F401
except ImportError:  # pragma: no cover - not seen in any supported version
    apply_primitive = _apply_primitive_via_jit

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


# Batch dimension of an unbatched operand in a batching rule (see the module docstring).
NOT_MAPPED = getattr(batching, "not_mapped", None)

