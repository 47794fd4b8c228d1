"""Tensor parallelism over attention heads: every op on a mesh axis that splits the heads.

A model served tensor-parallel (Megatron-style) keeps on each device its share of the query
heads and of the KV heads, and of every page: the pages are split on their head axis, the
block tables, lengths and slot mappings are replicated. Attention needs nothing from another
device then, so each device runs our kernel on its local heads:

    tp = jpa.sharding.HeadParallel(mesh, "tp")
    out = tp.paged_decode(q, k_pages, v_pages, block_tables, seq_lens)   # inside jax.jit

Each method is `jax.shard_map` over the op with the specs below; outputs stay head-sharded,
nothing is gathered (no collective at all), and arrays already placed with `tp.spec_*`
shardings are used where they are. Query heads and KV heads must both divide by the axis
size (GQA groups stay whole on one device). Head axes:

    q, out               [T, Hq, D]                 heads on axis 1
    lse, sinks           [T, Hq], [Hq]              heads on the last axis
    pages "NHD"          [P, page, Hkv, D]          axis 2 (combined [P, 2, page, Hkv, D]: 3)
    pages "HND"          [P, Hkv, page, D]          axis 1 (combined: 2)
    pages "interleaved"  [P, page, 2*Hkv, D]        axis 2 (device d holds K/V pairs of its heads)
    new k, v (append)    [T, Hkv, D]                axis 1
    stacked caches       [num_layers, ...]          one more leading axis

A `StridedView` is not split here: make views inside the per-device code (e.g. `split_qkv`
of the device's column-parallel QKV projection), or pass arrays.
"""
from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from . import api, ragged
from .views import StridedView


def _page_head_axis(kv_layout: str, combined: bool) -> int:
    if kv_layout == "interleaved":
        return 2
    base = 2 if kv_layout == "NHD" else 1
    return base + (1 if combined else 0)


class HeadParallel:
    """The ops split over the heads on mesh axis `axis` (see the module docstring)."""

    def __init__(self, mesh: jax.sharding.Mesh, axis: str = "tp"):
        if axis not in mesh.axis_names:
            raise ValueError(f"HeadParallel: mesh has no axis {axis!r} (axes {mesh.axis_names})")
        self.mesh, self.axis = mesh, axis
        self.size = int(mesh.shape[axis])

    # ------------------------------------------------------------------ specs and placement

    def spec_q(self) -> P:
        """q / out [T, Hq, D] (and new k / v [T, Hkv, D])."""
        return P(None, self.axis, None)

    def spec_pages(self, ndim: int, kv_layout: str = "NHD", combined: bool = False,
                   stacked: bool = False) -> P:
        """Pages of rank `ndim` in `kv_layout` (combined: [P, 2, ...]; stacked: a leading
        layer axis)."""
        axes = [None] * ndim
        axes[_page_head_axis(kv_layout, combined) + (1 if stacked else 0)] = self.axis
        return P(*axes)

    def place(self, x, spec: P):
        """`x` on the mesh with `spec` (a NamedSharding)."""
        return jax.device_put(x, NamedSharding(self.mesh, spec))

    # ------------------------------------------------------------------ checks

    def _heads(self, name, n):
        if n % self.size:
            raise ValueError(f"{name}: {n} heads do not divide over mesh axis {self.axis!r} of "
                             f"size {self.size}")

    def _array(self, name, x):
        if isinstance(x, StridedView):
            raise TypeError(f"{name}: HeadParallel splits arrays, not StridedView; make the "
                            "view inside the per-device code (split_qkv of the local QKV "
                            "projection) or pass an array")
        return x

    def _page_specs(self, k_pages, v_pages, kv_layout, layer):
        combined = v_pages is None and kv_layout != "interleaved"
        stacked = layer is not None
        self._array("k_pages", k_pages)
        spec = self.spec_pages(k_pages.ndim, kv_layout, combined, stacked)
        heads = k_pages.shape[_page_head_axis(kv_layout, combined) + (1 if stacked else 0)]
        self._heads("k_pages", heads // 2 if kv_layout == "interleaved" else heads)
        return spec, (None if v_pages is None else spec)

    # ------------------------------------------------------------------ the ops

    def _run(self, fn, operands, in_specs, out_specs):
        """shard_map of fn over the operands (None operands stay None, specs aligned)."""
        idx = [i for i, x in enumerate(operands) if x is not None]

        def local(*present):
            full = list(operands)
            for i, x in zip(idx, present):
                full[i] = x
            return fn(*full)

        mapped = jax.shard_map(local, mesh=self.mesh,
                               in_specs=tuple(in_specs[i] for i in idx), out_specs=out_specs)
        return mapped(*(operands[i] for i in idx))

    def _attention(self, op, q, k_pages, v_pages, meta, kw):
        self._array("q", q)
        self._heads("q", q.shape[1])
        kv_layout = kw.get("kv_layout", "NHD")
        layer = kw.pop("layer", None)
        sinks = kw.pop("sinks", None)
        kspec, vspec = self._page_specs(k_pages, v_pages, kv_layout, layer)
        traced_layer = layer is not None and not isinstance(layer, int)
        head = self.spec_q()
        out_spec = (head, P(None, self.axis)) if kw.get("return_lse") else head

        def fn(q, k, v, sinks, lay, *meta):
            return op(q, k, v, *meta, sinks=sinks,
                      layer=lay if traced_layer else layer, **kw)

        operands = (q, k_pages, v_pages, sinks, layer if traced_layer else None) + meta
        specs = (head, kspec, vspec, P(self.axis), P()) + (P(),) * len(meta)
        return self._run(fn, operands, specs, out_spec)

    def paged_decode(self, q, k_pages, v_pages, block_tables, seq_lens, **kw):
        """`jax_paged_attn.paged_decode` on each device's heads."""
        return self._attention(api.paged_decode, q, k_pages, v_pages,
                               (block_tables, seq_lens), dict(kw))

    def paged_prefill(self, q, k_pages, v_pages, block_tables, seq_lens, cu_seqlens_q, **kw):
        """`jax_paged_attn.paged_prefill` on each device's heads."""
        return self._attention(api.paged_prefill, q, k_pages, v_pages,
                               (block_tables, seq_lens, cu_seqlens_q), dict(kw))

    def ragged_paged_attention(self, q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                               **kw):
        """`jax_paged_attn.ragged_paged_attention` on each device's heads (interleaved pages
        split on their combined head axis: device d holds the K/V pairs of its heads)."""
        self._array("q", q)
        self._heads("q", q.shape[1])
        layer = kw.pop("layer", None)
        kspec, _ = self._page_specs(kv_pages, None, "interleaved", layer)
        traced_layer = layer is not None and not isinstance(layer, int)

        def fn(q, kv, lay, *meta):
            return ragged.ragged_paged_attention(q, kv, *meta,
                                                 layer=lay if traced_layer else layer, **kw)

        operands = (q, kv_pages, layer if traced_layer else None, kv_lens, page_indices,
                    cu_q_lens, num_seqs)
        specs = (self.spec_q(), kspec, P(), P(), P(), P(), P())
        return self._run(fn, operands, specs, self.spec_q())

    def _append(self, op, k_pages, v_pages, k, v, slot_mapping, kv_layout, kw):
        layer = kw.pop("layer", None)
        kspec, vspec = self._page_specs(k_pages, v_pages, kv_layout, layer)
        for name, x in (("k", k), ("v", v)):
            self._array(name, x)
            self._heads(name, x.shape[1])
        traced_layer = layer is not None and not isinstance(layer, int)

        def fn(kp, vp, k, v, slots, lay):
            return op(kp, vp, k, v, slots, layer=lay if traced_layer else layer, **kw)

        operands = (k_pages, v_pages, k, v, slot_mapping, layer if traced_layer else None)
        specs = (kspec, vspec, self.spec_q(), self.spec_q(), P(), P())
        return self._run(fn, operands, specs, (kspec, vspec) if vspec is not None else kspec)

    def append_kv(self, k_pages, v_pages, k, v, slot_mapping, **kw):
        """`jax_paged_attn.append_kv` on each device's KV heads; returns the updated pages
        (same shardings: donate them as usual)."""
        kv_layout = kw.get("kv_layout", "NHD")

        def op(kp, vp, k, v, slots, **kw_):
            out = api.append_kv(kp, vp, k, v, slots, **kw_)
            return out if vp is not None else out[0]

        res = self._append(op, k_pages, v_pages, k, v, slot_mapping, kv_layout, dict(kw))
        return res if v_pages is not None else (res, None)

    def ragged_append_kv(self, kv_pages, k, v, slot_mapping, **kw):
        """`jax_paged_attn.ragged_append_kv` on each device's KV heads."""
        def op(kp, _vp, k, v, slots, **kw_):
            return ragged.ragged_append_kv(kp, k, v, slots, **kw_)

        return self._append(op, kv_pages, None, k, v, slot_mapping, "interleaved", dict(kw))
