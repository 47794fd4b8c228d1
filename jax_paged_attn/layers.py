"""A stacked, layer-indexed KV cache: pages `[num_layers, P, ...]` plus a layer index.

A model that scans its layers and slices `k_stack[l]` out of a stacked cache makes XLA
materialize that slice (a copy of the layer's whole cache) before every custom call. Instead
the ops take the whole stack and a (possibly traced) `layer`: the layer axis is merged into
the page axis with a reshape (`[N, P, ...] -> [N*P, ...]`, a bitcast in XLA's default
layout), and the metadata is offset into layer `layer`'s pages. The kernels see one flat
pool and need no change.

Semantics (docs/semantics.md, "Stacked caches"): block tables and slot mappings keep
indexing pages `0..P-1` of the layer; an entry outside that range stays outside the pool
(invalid exactly as before); a runtime `layer` outside `[0, N)` makes every request invalid
(NaN rows) and every appended token skipped, so no other layer is ever read or written.
"""

from __future__ import annotations

import numbers

import jax.numpy as jnp
import numpy as np

# Slots are int32 in the kernels: the whole flat pool must be addressable.
_MAX_SLOTS = 2**31


def _fail(msg, exc=ValueError):
    raise exc(f"layer: {msg}")


def layer_index(layer, num_layers):
    """`layer` as `(index, in_range)`.

    A Python int (or numpy integer) stays a Python int and `in_range` is a Python bool. An
    integer scalar array (traced or not) becomes an int32 scalar array and `in_range` a bool
    scalar array. Anything else raises naming `layer`.
    """
    if isinstance(layer, (bool, np.bool_)):
        _fail(f"expected an int or an integer scalar array, got {layer!r}", TypeError)
    if isinstance(layer, numbers.Integral):
        layer = int(layer)
        return layer, 0 <= layer < num_layers
    if not hasattr(layer, "shape") or not hasattr(layer, "dtype"):
        _fail(f"expected an int or an integer scalar array, got {type(layer).__name__}",
              TypeError)
    if not jnp.issubdtype(layer.dtype, jnp.integer):
        _fail(f"expected an integer dtype, got {layer.dtype}", TypeError)
    if tuple(layer.shape) != ():
        _fail(f"expected a scalar, got shape {tuple(layer.shape)}")
    layer = jnp.asarray(layer)
    if jnp.dtype(layer.dtype).itemsize > 4:
        # 64-bit values could wrap into range on the int32 cast; clip them first (num_layers
        # < 2**31 always, see LayerStack).
        layer = jnp.clip(layer, -1, num_layers)
    # uint32 values >= 2**31 turn negative here, which is still out of range.
    layer = layer.astype(jnp.int32)
    return layer, (layer >= 0) & (layer < num_layers)


class LayerStack:
    """Where layer `layer` of a stack of `num_layers` x `pages_per_layer` pages sits in the
    flat pool, and the metadata rewritten to address it."""

    def __init__(self, layer, num_layers, pages_per_layer, page_size):
        slots = num_layers * pages_per_layer * page_size
        if slots >= _MAX_SLOTS:
            raise ValueError(
                f"k_pages: a stacked cache of {num_layers} layers x {pages_per_layer} pages x "
                f"page_size {page_size} = {slots} slots exceeds the int32 slot range "
                f"(must be < 2**31)")
        index, ok = layer_index(layer, num_layers)
        if isinstance(index, int) and not ok:
            _fail(f"{index} outside [0, {num_layers}) (the stack's leading axis)")
        self.num_layers = num_layers
        self.pages = pages_per_layer
        self.page_size = page_size
        self.static = isinstance(index, int)
        self.ok = ok
        # An out-of-range runtime layer addresses layer 0 here, but `ok` then invalidates
        # every request / skips every token, so nothing is read or written through it.
        safe = index if self.static else jnp.where(ok, index, 0)
        self.first_page = safe * pages_per_layer

    def _valid(self, mask):
        return mask if self.static else mask & self.ok

    def block_tables(self, block_tables):
        """Page p of the layer -> page layer*P + p of the pool; anything outside [0, P)
        -> -1, still outside the pool, so that request stays invalid as before."""
        inside = self._valid((block_tables >= 0) & (block_tables < self.pages))
        return jnp.where(inside, block_tables + self.first_page, -1)

    def seq_lens(self, seq_lens):
        """A negative length invalidates a request (semantics rule 2): all of them when the
        runtime layer is out of range."""
        return seq_lens if self.static else jnp.where(self.ok, seq_lens, -1)

    def slot_mapping(self, slot_mapping):
        """Slot s of the layer -> slot s + layer*P*page_size of the pool; a slot outside
        [0, P*page_size) (or any slot for an out-of-range layer) -> -1, skipped."""
        limit = self.pages * self.page_size
        inside = self._valid((slot_mapping >= 0) & (slot_mapping < limit))
        return jnp.where(inside, slot_mapping + self.first_page * self.page_size, -1)
