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


class StridedView:
    """A view of `base`'s row-major memory: element `idx` of the view is element
    `offset + sum(idx[i] * strides[i])` of `base.reshape(-1)`.

    Requirements (checked here, at trace time): innermost stride 1, strides non-negative, and
    every reachable element inside `base`.
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


def page_geometry(shape, kv_layout: str, combined: bool) -> tuple[int, int, int, int]:
    """(num_pages, page_size, num_kv_heads, head_dim) of a page array of `shape`: "NHD" is
    [P, page, Hkv, D], "HND" [P, Hkv, page, D], after the [P, 2] prefix of combined pages.
    Shapes only; callers check ranks first."""
    geom = tuple(shape[2:]) if combined else tuple(shape[1:])
    page_size, num_heads = (geom[0], geom[1]) if kv_layout == "NHD" else (geom[1], geom[0])
    return int(shape[0]), int(page_size), int(num_heads), int(geom[2])


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
