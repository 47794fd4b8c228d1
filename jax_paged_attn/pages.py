"""Everything about the page cache's geometry in one place: the layouts and their codes,
the shape of a page array (separate, combined, stacked per layer), the checks of page
operands, and the stacked, layer-indexed cache.

A stacked cache is pages `[num_layers, P, ...]` plus a layer index. A model that scans its
layers and slices `k_stack[l]` out of a stacked cache makes XLA
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

from .checks import PAGE_DTYPES, fail, require_array
from .views import StridedView

# Slots are int32 in the kernels: the whole flat pool must be addressable.
_MAX_SLOTS = 2**31


# kv_layout names and the codes the kernels receive as the `kv_layout` attribute.
# "interleaved": one array [P, page, 2*Hkv, D] whose combined head 2h is K head h and 2h+1
# V head h (the layout of JAX's TPU ragged_paged_attention); always combined (v_pages=None).
LAYOUT_CODES = {"NHD": 0, "HND": 1, "interleaved": 2}
LAYOUT_NAMES = {code: name for name, code in LAYOUT_CODES.items()}


def _fail_layer(msg, exc=ValueError):
    raise exc(f"layer: {msg}")


def page_geometry(shape, kv_layout: str, combined: bool) -> tuple[int, int, int, int]:
    """(num_pages, page_size, num_kv_heads, head_dim) of a page array of `shape`: "NHD" is
    [P, page, Hkv, D], "HND" [P, Hkv, page, D], after the [P, 2] prefix of combined pages;
    "interleaved" is [P, page, 2*Hkv, D]. Shapes only; callers check ranks first."""
    if kv_layout == "interleaved":
        return int(shape[0]), int(shape[1]), int(shape[2]) // 2, int(shape[3])
    geom = tuple(shape[2:]) if combined else tuple(shape[1:])
    page_size, num_heads = (geom[0], geom[1]) if kv_layout == "NHD" else (geom[1], geom[0])
    return int(shape[0]), int(page_size), int(num_heads), int(geom[2])


def layer_index(layer, num_layers):
    """`layer` as `(index, in_range)`.

    A Python int (or numpy integer) stays a Python int and `in_range` is a Python bool. An
    integer scalar array (traced or not) becomes an int32 scalar array and `in_range` a bool
    scalar array. Anything else raises naming `layer`.
    """
    if isinstance(layer, (bool, np.bool_)):
        _fail_layer(f"expected an int or an integer scalar array, got {layer!r}", TypeError)
    if isinstance(layer, numbers.Integral):
        layer = int(layer)
        return layer, 0 <= layer < num_layers
    if not hasattr(layer, "shape") or not hasattr(layer, "dtype"):
        _fail_layer(f"expected an int or an integer scalar array, got {type(layer).__name__}",
              TypeError)
    if not jnp.issubdtype(layer.dtype, jnp.integer):
        _fail_layer(f"expected an integer dtype, got {layer.dtype}", TypeError)
    if tuple(layer.shape) != ():
        _fail_layer(f"expected a scalar, got shape {tuple(layer.shape)}")
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
            _fail_layer(f"{index} outside [0, {num_layers}) (the stack's leading axis)")
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


_PAGE_DIMS = {"NHD": ["page_size", "Hkv", "D"], "HND": ["Hkv", "page_size", "D"],
              "interleaved": ["page_size", "2*Hkv", "D"]}


class PagePool:
    """Checked page operands: geometry plus what the primitives need.

    With `layer`, the operands are a stack `[num_layers, <pages>]` that the kernels see as one
    flat pool of num_layers * P pages (LayerStack); `block_tables`, `seq_lens` and `slots`
    rewrite the metadata into that pool and `unstack` restores the stacked shape.
    """

    def __init__(self, k_pages, v_pages, kv_layout, layer=None, *, flatten=True):
        """Checks the page operands. `flatten=False` (the reference) only checks and reads
        the geometry; the operands are left as given."""
        if kv_layout not in LAYOUT_CODES:
            fail("kv_layout", f"expected 'NHD', 'HND' or 'interleaved', got {kv_layout!r}")
        if kv_layout == "interleaved" and v_pages is not None:
            fail("v_pages", "interleaved pages hold K and V in one array: pass v_pages=None")
        require_array(k_pages, "k_pages")
        if isinstance(k_pages, StridedView) or isinstance(v_pages, StridedView):
            fail("k_pages", "pages must be plain arrays (their strides come from kv_layout)",
                  TypeError)
        if jnp.dtype(k_pages.dtype) not in PAGE_DTYPES:
            fail("k_pages", f"dtype {k_pages.dtype} not supported (expected bfloat16, "
                             "float16, float32 or float8_e4m3fn)", TypeError)
        self.combined = v_pages is None
        stacked = layer is not None
        shape = tuple(k_pages.shape)
        kv_axis = self.combined and kv_layout != "interleaved"
        dims = ((["num_layers"] if stacked else []) + ["P"] + (["2"] if kv_axis else [])
                + _PAGE_DIMS[kv_layout])
        rank = len(dims)
        if len(shape) != rank:
            hint = ""
            if not stacked and len(shape) == rank + 1:
                hint = " (a stacked [num_layers, ...] cache needs layer=)"
            what = "combined pages (v_pages=None)" if self.combined else "pages"
            fail("k_pages", f"{what} must be rank {rank} [{', '.join(dims)}] ({kv_layout}"
                             f"{', layer given' if stacked else ''}), got shape {shape}{hint}")
        lead = 1 if stacked else 0
        if kv_layout == "interleaved" and shape[lead + 2] % 2:
            fail("k_pages", f"interleaved pages need an even number of combined heads "
                            f"(2*Hkv), got {shape}")
        if kv_axis and shape[lead + 1] != 2:
            fail("k_pages", f"combined pages need axis {lead + 1} of size 2 (K, V), got "
                             f"{shape}")
        if not self.combined:
            require_array(v_pages, "v_pages")
            if tuple(v_pages.shape) != shape:
                fail("v_pages", f"shape {tuple(v_pages.shape)} differs from k_pages {shape}")
            if v_pages.dtype != k_pages.dtype:
                fail("v_pages", f"dtype {v_pages.dtype} differs from k_pages {k_pages.dtype}",
                      TypeError)
        self.layout = LAYOUT_CODES[kv_layout]
        num_pages, self.page_size, self.num_heads, self.head_dim = page_geometry(
            shape[lead:], kv_layout, self.combined)
        if self.page_size < 1 or self.num_heads < 1 or self.head_dim < 1:
            fail("k_pages", f"page_size, num_kv_heads and head_dim must be >= 1, got {shape}")
        self.shape = shape
        self.stack = None
        if stacked:
            self.stack = LayerStack(layer, shape[0], num_pages, self.page_size)
        if stacked and flatten:
            # Layer axis merged into the page axis: a bitcast for the default layout, so the
            # custom call reads (and append writes, aliased) the stack itself.
            flat = (shape[0] * shape[1],) + shape[2:]
            k_pages = jnp.reshape(k_pages, flat)
            v_pages = None if self.combined else jnp.reshape(v_pages, flat)
        self.k = k_pages
        # Combined pages: an empty stand-in keeps the custom call's arity fixed.
        self.v = jnp.zeros((0,), k_pages.dtype) if self.combined else v_pages

    def block_tables(self, block_tables):
        return block_tables if self.stack is None else self.stack.block_tables(block_tables)

    def seq_lens(self, seq_lens):
        return seq_lens if self.stack is None else self.stack.seq_lens(seq_lens)

    def slots(self, slot_mapping):
        return slot_mapping if self.stack is None else self.stack.slot_mapping(slot_mapping)

    def unstack(self, pages):
        """An updated pool in the caller's (possibly stacked) shape."""
        return pages if self.stack is None else jnp.reshape(pages, self.shape)
