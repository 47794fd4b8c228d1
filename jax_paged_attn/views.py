"""Strided views: an operand described as (base buffer, shape, strides, offset).

XLA hands a custom call a pointer and logical dims, never strides, and slicing a packed QKV
projection before a custom call makes XLA copy it. A `StridedView` instead travels to the
kernel as its whole base buffer plus offset and stride attributes (in elements), so a query
sliced out of a fused projection costs no copy.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _row_major_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= int(d)
    return tuple(reversed(strides))


@jax.tree_util.register_pytree_node_class
class StridedView:
    """A view of `base`'s row-major memory: element `idx` of the view is element
    `offset + sum(idx[i] * strides[i])` of `base.reshape(-1)`.

    Args:
      base: the array that holds the data, any shape and dtype.
      shape: the view's logical shape (a sequence of ints; ops take rank 3,
        `[tokens, heads, head_dim]`).
      strides: the distance, in elements of `base`, between neighbours along each axis.
      offset: the element of `base.reshape(-1)` where the view starts.

    Requirements (checked here, at trace time, with a ValueError): innermost stride 1,
    strides and offset non-negative, and every reachable element inside `base`.

    A view is a pytree whose only leaf is `base`; shape, strides and offset are static
    auxiliary data. So a view crosses `jax.jit`, `jax.vmap`, `lax.scan` and `shard_map`
    boundaries like an array, and `jax.tree.map` reaches its base. The geometry always refers
    to the base as the leaf is seen *inside* the transformation: a view returned from
    `jax.vmap` has a base with the mapped axis added, and mapping over that axis again gives
    back per-example bases that the view describes.
    """

    def __init__(self, base, shape, strides, offset=0):
        if not hasattr(base, "shape") or not hasattr(base, "dtype"):
            raise TypeError(f"StridedView: base must be an array, got {type(base).__name__}")
        shape = tuple(int(s) for s in shape)
        strides = tuple(int(s) for s in strides)
        offset = int(offset)
        if len(shape) != len(strides):
            raise ValueError(
                f"StridedView: shape {shape} and strides {strides} must have the same length")
        if len(shape) == 0:
            raise ValueError("StridedView: shape must have at least one dimension")
        if any(s < 0 for s in shape):
            raise ValueError(f"StridedView: shape {shape} has a negative dimension")
        if strides[-1] != 1:
            raise ValueError(
                f"StridedView: innermost stride must be 1 (head_dim contiguous), got strides "
                f"{strides}")
        if any(s < 0 for s in strides):
            raise ValueError(f"StridedView: strides {strides} must be non-negative")
        if offset < 0:
            raise ValueError(f"StridedView: offset {offset} must be non-negative")
        size = int(math.prod(base.shape))
        if math.prod(shape) > 0:
            last = offset + sum((d - 1) * s for d, s in zip(shape, strides))
            if last >= size:
                raise ValueError(
                    f"StridedView: view of shape {shape}, strides {strides}, offset {offset} "
                    f"reaches element {last} but base {tuple(base.shape)} has only {size} "
                    f"elements")
        self.base = base
        self.shape = shape
        self.strides = strides
        self.offset = offset

    # Pytree protocol. Unflattening skips the checks: JAX rebuilds views around tracers,
    # batched values and placeholder objects (None, sentinels) that have no shape to check.
    def tree_flatten(self):
        return (self.base,), (self.shape, self.strides, self.offset)

    @classmethod
    def tree_unflatten(cls, aux, children):
        view = object.__new__(cls)
        view.base = children[0]
        view.shape, view.strides, view.offset = aux
        return view

    @property
    def dtype(self):
        return self.base.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return (f"StridedView(base={tuple(self.base.shape)}:{self.dtype}, shape={self.shape}, "
                f"strides={self.strides}, offset={self.offset})")

    def materialize(self) -> jax.Array:
        """A dense row-major copy of the view (used by the reference and the batching rule)."""
        flat = jnp.reshape(self.base, (-1,))
        idx = np.full(self.shape, self.offset, dtype=np.int64)
        for axis, (d, s) in enumerate(zip(self.shape, self.strides)):
            shape = [1] * len(self.shape)
            shape[axis] = d
            idx = idx + (np.arange(d, dtype=np.int64) * s).reshape(shape)
        if idx.size == 0:
            return jnp.zeros(self.shape, self.dtype)
        return flat[jnp.asarray(idx.astype(np.int32 if idx.max() < 2**31 else np.int64))]


def as_view(x, name: str) -> StridedView:
    """An array or view as a view (a plain array is a view with its own row-major strides)."""
    if isinstance(x, StridedView):
        return x
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array or StridedView, got {type(x).__name__}")
    return StridedView(x, x.shape, _row_major_strides(x.shape), 0)


def materialize(x) -> jax.Array:
    """A dense array for either a plain array or a StridedView."""
    if isinstance(x, StridedView):
        return x.materialize()
    return jnp.asarray(x)


def split_qkv(qkv, num_q_heads: int, num_kv_heads: int, head_dim: int | None = None):
    """Views `(q, k, v)` of a packed projection, q heads first, then k, then v.

    `qkv` is `[T, (Hq + 2*Hkv) * D]` (then `head_dim` may be given or is inferred) or
    `[T, Hq + 2*Hkv, D]`. No data moves: each result is a `StridedView` of `qkv`.
    """
    if not hasattr(qkv, "shape"):
        raise TypeError(f"split_qkv: qkv must be an array, got {type(qkv).__name__}")
    hq, hkv = int(num_q_heads), int(num_kv_heads)
    if hq <= 0 or hkv <= 0:
        raise ValueError(
            f"split_qkv: num_q_heads ({hq}) and num_kv_heads ({hkv}) must be positive")
    heads = hq + 2 * hkv
    if qkv.ndim == 2:
        width = int(qkv.shape[1])
        if head_dim is None:
            if width % heads:
                raise ValueError(
                    f"split_qkv: qkv width {width} is not divisible by num_q_heads + "
                    f"2*num_kv_heads = {heads}")
            head_dim = width // heads
        if int(head_dim) * heads != width:
            raise ValueError(
                f"split_qkv: qkv width {width} != (num_q_heads + 2*num_kv_heads) * head_dim "
                f"= {heads} * {head_dim}")
    elif qkv.ndim == 3:
        if int(qkv.shape[1]) != heads:
            raise ValueError(
                f"split_qkv: qkv has {qkv.shape[1]} heads, expected num_q_heads + "
                f"2*num_kv_heads = {heads}")
        if head_dim is not None and int(head_dim) != int(qkv.shape[2]):
            raise ValueError(
                f"split_qkv: head_dim {head_dim} != qkv.shape[2] = {qkv.shape[2]}")
        head_dim = int(qkv.shape[2])
    else:
        raise ValueError(f"split_qkv: qkv must be rank 2 or 3, got shape {tuple(qkv.shape)}")
    d = int(head_dim)
    t = int(qkv.shape[0])
    row = heads * d
    q = StridedView(qkv, (t, hq, d), (row, d, 1), 0)
    k = StridedView(qkv, (t, hkv, d), (row, d, 1), hq * d)
    v = StridedView(qkv, (t, hkv, d), (row, d, 1), (hq + hkv) * d)
    return q, k, v
