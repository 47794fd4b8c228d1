"""JAX primitives for the three ops: abstract evaluation, lowering per platform through the
XLA FFI, batching, and a clear refusal to differentiate.

Operands are already validated and normalized by `api.py`: a strided operand arrives as its
base buffer, with its shape, offset and strides as static parameters.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _registry, compat, launch_options
from .pages import LAYOUT_NAMES, page_geometry
from .views import StridedView

# ----------------------------------------------------------------------------- primitives

decode_p = compat.Primitive("jpa_paged_decode")
prefill_p = compat.Primitive("jpa_paged_prefill")
append_p = compat.Primitive("jpa_append_kv")
for _p in (decode_p, prefill_p, append_p):
    _p.multiple_results = True

GPU_HEAD_DIMS = (64, 128, 256)
_GPU_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _attention_abstract_eval(q_base, *operands, q_shape, out_dtype, **_):
    t, hq, _d = q_shape
    vary = compat.varying_axes(q_base, *operands)
    return (compat.ShapedArray(tuple(q_shape), np.dtype(out_dtype), **vary),
            compat.ShapedArray((t, hq), np.dtype(np.float32), **vary))


def _append_abstract_eval(k_pages, v_pages, *operands, **_):
    vary = compat.varying_axes(k_pages, v_pages, *operands)
    return (compat.ShapedArray(k_pages.shape, k_pages.dtype, **vary),
            compat.ShapedArray(v_pages.shape, v_pages.dtype, **vary))


for _p, _eval in ((decode_p, _attention_abstract_eval), (prefill_p, _attention_abstract_eval),
                 (append_p, _append_abstract_eval)):
    _p.def_impl(functools.partial(compat.apply_primitive, _p))  # eager calls go through jit
    _p.def_abstract_eval(_eval)

# ----------------------------------------------------------------------------- lowering


def _attention_attrs(*, q_shape, q_offset, q_strides, kv_layout, kv_combined, sm_scale,
                     softcap, window_left, causal, q_len_per_req, max_q_len, **_):
    # Explicit numpy types: a Python float is f64 and would not decode as Attr<float>.
    return dict(
        q_offset=np.int64(q_offset), q_strides=np.asarray(q_strides, np.int64),
        num_q_heads=np.int64(q_shape[1]), kv_layout=np.int64(kv_layout),
        kv_combined=np.int64(kv_combined), sm_scale=np.float32(sm_scale),
        softcap=np.float32(softcap), window_left=np.int64(window_left),
        causal=np.int64(causal), q_len_per_req=np.int64(q_len_per_req),
        max_q_len=np.int64(max_q_len))


def _append_attrs(*, k_offset, k_strides, v_offset, v_strides, kv_layout, kv_combined, **_):
    return dict(k_offset=np.int64(k_offset), k_strides=np.asarray(k_strides, np.int64),
                v_offset=np.int64(v_offset), v_strides=np.asarray(v_strides, np.int64),
                kv_layout=np.int64(kv_layout), kv_combined=np.int64(kv_combined))


def _check_cuda_supported(ctx, params):
    """Static limits of the CUDA kernels, raised while lowering (i.e. at trace/compile time)."""
    d = params["q_shape"][2]
    if d not in GPU_HEAD_DIMS:
        raise ValueError(f"jax_paged_attn: head_dim {d} is not supported on the GPU "
                         f"(supported: {GPU_HEAD_DIMS})")
    q_aval, k_aval = ctx.avals_in[0], ctx.avals_in[1]
    if q_aval.dtype not in _GPU_DTYPES:
        raise TypeError(f"jax_paged_attn: q dtype {q_aval.dtype} is not supported on the GPU "
                        "(use bfloat16 or float16)")
    if k_aval.dtype not in _GPU_DTYPES + (jnp.dtype(jnp.float8_e4m3fn),):
        raise TypeError(f"jax_paged_attn: page dtype {k_aval.dtype} is not supported on the "
                        "GPU (use bfloat16, float16 or float8_e4m3fn)")
    if _registry.extension() and not _registry.has_cuda_kernels() and compat.gpu_available():
        raise RuntimeError("jax_paged_attn was built without CUDA kernels (JPA_CUDA=OFF or no "
                           "nvcc at build time); rebuild with JPA_CUDA=ON to run on the GPU")


def _cpu_attention_lowering(name):
    def rule(ctx, *operands, **params):
        return compat.ffi_lowering(name)(ctx, *operands, **_attention_attrs(**params),
                                         **launch_options.defaults())
    return rule


def _cuda_attention_lowering(name):
    def rule(ctx, *operands, **params):
        _check_cuda_supported(ctx, params)
        t, hq, d = params["q_shape"]
        bt = ctx.avals_in[3]
        _, page_size, num_kv_heads, _ = page_geometry(
            ctx.avals_in[1].shape, LAYOUT_NAMES[params["kv_layout"]], params["kv_combined"])
        # The kernels' 32-bit index limits (ffi_src/common/gpu_limits.h), from the extension.
        # (max_q_len is q_len_per_req for decode.)
        why = _registry.extension().gpu_shape_limit(
            num_tokens=t, num_q_heads=hq, group=hq // num_kv_heads, head_dim=d, batch=bt.shape[0],
            max_pages_per_req=bt.shape[1], page_size=page_size, max_q_len=params["max_q_len"])
        if why:
            raise ValueError(f"jax_paged_attn: {why} on the GPU (shapes: q {params['q_shape']},"
                             f" block_tables {tuple(bt.shape)}, page_size {page_size})")
        # The launcher's switches as the environment sets them now (launch_options.py).
        switches = launch_options.from_environment()
        # The size is the extension's (ffi_src/common/workspace.h, shared with the launcher):
        # the Python side never re-derives the kernels' tiling.
        nbytes = _registry.extension().attention_workspace_bytes(
            num_tokens=t, num_q_heads=hq, num_kv_heads=num_kv_heads, head_dim=d,
            batch=bt.shape[0], max_pages_per_req=bt.shape[1], page_size=page_size,
            max_q_len=params["max_q_len"],
            mixed_split=name.endswith("prefill") and bool(switches["launch_mixed"]))
        # The split-KV workspace is an extra XLA-allocated output (CUDA-graph safe), hidden
        # from the primitive's results.
        ws = compat.ShapedArray((int(nbytes),), np.dtype(np.uint8))
        wctx = compat.replace_avals_out(ctx, [*ctx.avals_out, ws])
        results = compat.ffi_lowering(name)(wctx, *operands, **_attention_attrs(**params),
                                            **switches)
        return results[:2]
    return rule


def _append_lowering(platform):
    def rule(ctx, *operands, **params):
        if platform == "cuda":
            k_aval = ctx.avals_in[0]
            if k_aval.dtype not in _GPU_DTYPES + (jnp.dtype(jnp.float8_e4m3fn),):
                raise TypeError(f"jax_paged_attn: page dtype {k_aval.dtype} is not supported "
                                "on the GPU (use bfloat16, float16 or float8_e4m3fn)")
        # Results 0/1 alias operands 0/1: the cache is updated in place (under donation XLA
        # needs no copy of it). The kernel needs row-major operands. Declared on the call
        # (operand_layouts), that makes XLA copy every aliased operand up front and rely on
        # later passes to drop the copy, which they do for a plain cache; for a reshaped
        # stack (layer=) the copy fuses with the bitcast and stays, a copy of the whole stack
        # per call. There the layouts are pinned on the operands instead.
        pin = params.get("layouts_on_operands", False)
        if pin:
            operands = [compat.pin_row_major(ctx, x, a) for x, a in zip(operands, ctx.avals_in)]
        return compat.ffi_lowering("jpa_append_kv", operand_output_aliases={0: 0, 1: 1},
                                   skip_ffi_layout_processing=pin)(
            ctx, *operands, **_append_attrs(**params))
    return rule


compat.mlir.register_lowering(decode_p, _cpu_attention_lowering("jpa_paged_decode"), "cpu")
compat.mlir.register_lowering(prefill_p, _cpu_attention_lowering("jpa_paged_prefill"), "cpu")
compat.mlir.register_lowering(append_p, _append_lowering("cpu"), "cpu")
compat.mlir.register_lowering(decode_p, _cuda_attention_lowering("jpa_paged_decode"),
                              "cuda")
compat.mlir.register_lowering(prefill_p, _cuda_attention_lowering("jpa_paged_prefill"),
                              "cuda")
compat.mlir.register_lowering(append_p, _append_lowering("cuda"), "cuda")

# ----------------------------------------------------------------------------- autodiff


def _not_differentiable(name):
    def jvp(primals, tangents, **params):
        raise NotImplementedError(
            f"jax_paged_attn.{name} is not differentiable (inference-only kernels); use "
            "jax_paged_attn.reference for gradients")
    return jvp


compat.ad.primitive_jvps[decode_p] = _not_differentiable("paged_decode")
compat.ad.primitive_jvps[prefill_p] = _not_differentiable("paged_prefill")
compat.ad.primitive_jvps[append_p] = _not_differentiable("append_kv")

# ----------------------------------------------------------------------------- batching


def _moveaxis0(x, bdim):
    if bdim is compat.NOT_MAPPED:
        return None
    return jnp.moveaxis(x, bdim, 0)


def _map_fallback(prim, args, dims, params):
    """vmap as a sequential lax.map over the batch (used when the cache itself is batched)."""
    mapped = [_moveaxis0(a, d) for a, d in zip(args, dims)]
    idx = [i for i, m in enumerate(mapped) if m is not None]

    def one(xs):
        full = list(args)
        for i, x in zip(idx, xs):
            full[i] = x
        return tuple(prim.bind(*full, **params))

    outs = jax.lax.map(one, tuple(mapped[i] for i in idx))
    return list(outs), [0] * len(outs)


class DecodeOperands(NamedTuple):
    """The decode primitive's operands, in bind order (api.paged_decode)."""

    q_base: object
    k_pages: object
    v_pages: object
    block_tables: object
    seq_lens: object
    scales: object
    sinks: object


def _decode_batch(args, dims, **params):
    nm = compat.NOT_MAPPED
    ops, bdims = DecodeOperands(*args), DecodeOperands(*dims)
    if any(d is not nm for d in (bdims.k_pages, bdims.v_pages, bdims.scales, bdims.sinks)):
        return _map_fallback(decode_p, args, dims, params)
    # Shared cache: fold the vmapped axis into the batch (one kernel call for all of it).
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not nm)
    t, hq, d = params["q_shape"]

    def dense_q(base):
        return StridedView(base, params["q_shape"], (*params["q_strides"], 1),
                           params["q_offset"]).materialize()

    def per_example(x, bdim):
        return jnp.broadcast_to(x, (size, *x.shape)) if bdim is nm else jnp.moveaxis(x, bdim, 0)

    if bdims.q_base is nm:
        q = jnp.broadcast_to(dense_q(ops.q_base), (size, t, hq, d))
    else:
        q = jax.vmap(dense_q)(jnp.moveaxis(ops.q_base, bdims.q_base, 0))
    bt = per_example(ops.block_tables, bdims.block_tables)
    sl = per_example(ops.seq_lens, bdims.seq_lens)
    q = q.reshape(size * t, hq, d)
    new = dict(params, q_shape=(size * t, hq, d), q_offset=0, q_strides=(hq * d, d))
    folded = ops._replace(q_base=q, block_tables=bt.reshape(-1, bt.shape[-1]),
                          seq_lens=sl.reshape(-1))
    out, lse = decode_p.bind(*folded, **new)
    return [out.reshape(size, t, hq, d), lse.reshape(size, t, hq)], [0, 0]


compat.batching.primitive_batchers[decode_p] = _decode_batch
compat.batching.primitive_batchers[prefill_p] = (
    lambda args, dims, **params: _map_fallback(prefill_p, args, dims, params))
# A vmapped append writes into one cache per batch element, so it maps rather than folds.
compat.batching.primitive_batchers[append_p] = (
    lambda args, dims, **params: _map_fallback(append_p, args, dims, params))
