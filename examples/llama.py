"""A Llama-style decoder (RMSNorm, RoPE, one fused QKV projection, GQA attention, SwiGLU MLP)
in two forms with the same weights:

* `paged_forward`: one serving step over a packed batch of new tokens (prefill chunks and
  decode tokens mixed), attending through jax_paged_attn over a stacked, layer-indexed cache
  that the step updates in place (donate it);
* `dense_forward`: a plain full-recompute forward pass of one sequence with dense causal
  attention, the oracle the paged path is tested against.

Weights are random here (nothing can be downloaded); `load_params` maps a checkpoint's
tensors (e.g. read with safetensors) onto the same pytree when a user has one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_paged_attn as jpa
from jax_paged_attn.cache import step_metadata


@dataclasses.dataclass(frozen=True)
class Config:
    vocab: int = 256
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    mlp: int = 128
    rope_theta: float = 10000.0
    eps: float = 1e-5
    dtype: str = "float32"

    @property
    def qkv_width(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim


LLAMA3_8B = Config(vocab=128256, layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128,
                   mlp=14336, rope_theta=500000.0, dtype="bfloat16")


def init_params(cfg: Config, key) -> dict:
    """Random weights (scaled so activations stay O(1)); layer weights stacked [L, ...]."""
    dt = jnp.dtype(cfg.dtype)
    ks = iter(jax.random.split(key, 8))
    L, H = cfg.layers, cfg.hidden

    def w(shape, fan_in):
        return (jax.random.normal(next(ks), shape, jnp.float32) / jnp.sqrt(fan_in)).astype(dt)

    return {
        "embed": w((cfg.vocab, H), 1.0),
        "attn_norm": jnp.ones((L, H), dt),
        "wqkv": w((L, H, cfg.qkv_width), H),
        "wo": w((L, cfg.heads * cfg.head_dim, H), cfg.heads * cfg.head_dim),
        "mlp_norm": jnp.ones((L, H), dt),
        "w_gate": w((L, H, cfg.mlp), H),
        "w_up": w((L, H, cfg.mlp), H),
        "w_down": w((L, cfg.mlp, H), cfg.mlp),
        "final_norm": jnp.ones((H,), dt),
        "lm_head": w((H, cfg.vocab), H),
    }


def load_params(cfg: Config, tensors: dict) -> dict:
    """Maps Hugging Face Llama tensor names (`model.layers.{i}.self_attn.q_proj.weight`, ...,
    as a dict of arrays, e.g. from `safetensors.numpy.load_file`) onto our pytree."""
    def t(name):
        return jnp.asarray(tensors[name], cfg.dtype)

    def stack(fmt, f=lambda x: x):
        return jnp.stack([f(t(fmt.format(i))) for i in range(cfg.layers)])

    def qkv(i):
        p = f"model.layers.{i}.self_attn."
        return jnp.concatenate([t(p + "q_proj.weight").T, t(p + "k_proj.weight").T,
                                t(p + "v_proj.weight").T], axis=1)

    return {
        "embed": t("model.embed_tokens.weight"),
        "attn_norm": stack("model.layers.{}.input_layernorm.weight"),
        "wqkv": jnp.stack([qkv(i) for i in range(cfg.layers)]),
        "wo": stack("model.layers.{}.self_attn.o_proj.weight", lambda x: x.T),
        "mlp_norm": stack("model.layers.{}.post_attention_layernorm.weight"),
        "w_gate": stack("model.layers.{}.mlp.gate_proj.weight", lambda x: x.T),
        "w_up": stack("model.layers.{}.mlp.up_proj.weight", lambda x: x.T),
        "w_down": stack("model.layers.{}.mlp.down_proj.weight", lambda x: x.T),
        "final_norm": t("model.norm.weight"),
        "lm_head": t("lm_head.weight").T,
    }


def rms_norm(x, w, eps):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def rope(x, positions, theta):
    """Rotary embedding (rotate-half form) of x [T, heads, D] at int positions [T]."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    ang = positions.astype(jnp.float32)[:, None] * inv[None, :]          # [T, D/2]
    cos, sin = jnp.cos(ang)[:, None, :], jnp.sin(ang)[:, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def _rotated_qkv(cfg, h, wqkv, positions):
    """The fused projection [T, (Hq + 2Hkv) * D] with RoPE applied to its q and k heads in
    place, so split_qkv can hand the attention ops views of it (no copy of q, k or v)."""
    qkv = (h @ wqkv).reshape(h.shape[0], cfg.heads + 2 * cfg.kv_heads, cfg.head_dim)
    qk = rope(qkv[:, :cfg.heads + cfg.kv_heads], positions, cfg.rope_theta)
    return jnp.concatenate([qk, qkv[:, cfg.heads + cfg.kv_heads:]], axis=1).reshape(
        h.shape[0], cfg.qkv_width)


def _mlp(cfg, x, lw, reduce=lambda y: y):
    """x + SwiGLU(x); `reduce` sums the row-parallel down projection under tensor
    parallelism."""
    h = rms_norm(x, lw["mlp_norm"], cfg.eps)
    return x + reduce((jax.nn.silu(h @ lw["w_gate"]) * (h @ lw["w_up"])) @ lw["w_down"])


_LAYER_KEYS = ("attn_norm", "wqkv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")


def split_layers(params: dict) -> dict:
    """`params` with the stacked layer weights [L, ...] replaced by "layers", a tuple of one
    dict of separate arrays per layer. `paged_forward` then runs the layers as a Python loop
    over those arrays. Measured on an H200 (Llama-3-8B shapes, B=64 decode step): 22.1 ms
    scanned over stacked weights, 13.1 ms unrolled. The 9 ms are about what copying each
    layer's weights out of the stack would cost (twice 16 GB of traffic), which is what we
    take XLA's GPU backend to do with the scan's dynamic slices before the GEMMs (inferred
    from the time, not read from its HLO). Compilation is longer: one body per layer.
    Call it once, outside jit; the stacked arrays can then be freed."""
    out = {name: x for name, x in params.items() if name not in _LAYER_KEYS}
    out["layers"] = tuple({name: params[name][i] for name in _LAYER_KEYS}
                          for i in range(params[_LAYER_KEYS[0]].shape[0]))
    return out


def paged_forward(params, cfg: Config, tokens, k_cache, v_cache, block_tables, start,
                  num_new, *, page_size: int, max_q_len: int, mesh=None, logit_rows=None):
    """One serving step. `tokens` [T] are the new tokens of the batch packed in request order
    (request b brings num_new[b] of them after start[b] cached ones; the rest is padding);
    the caches are stacked [L, P, page, Hkv, D]. Returns (logits [T, V], k_cache, v_cache);
    with `logit_rows` (int [R], token indices) only those rows' logits [R, V] (a step samples
    one token per request: the LM head over every prefill token would cost more than a
    decode step's attention).

    `params` as `init_params` makes them (layers scanned) or as `split_layers` (layers
    unrolled over separate arrays, the faster form on a GPU). With `mesh` (an axis "tp"),
    the layers run tensor-parallel: `params` and the caches as `shard_params` /
    `cache_sharding` place them, each device attends over its own heads' pages and computes
    its share of the MLP, and one all-reduce per block sums the row-parallel projections
    (Megatron)."""
    meta = step_metadata(block_tables, start, num_new, num_tokens=tokens.shape[0],
                         page_size=page_size)
    x = params["embed"][tokens]
    tp = 1 if mesh is None else int(mesh.shape["tp"])
    local = dataclasses.replace(cfg, heads=cfg.heads // tp, kv_heads=cfg.kv_heads // tp,
                                mlp=cfg.mlp // tp)

    def reduce(y):
        return y if mesh is None else jax.lax.psum(y, "tp")

    def layer(x, kc, vc, i, lw, positions, slot_mapping, seq_lens, cu):
        h = rms_norm(x, lw["attn_norm"], local.eps)
        q, k, v = jpa.split_qkv(_rotated_qkv(local, h, lw["wqkv"], positions),
                                local.heads, local.kv_heads)
        kc, vc = jpa.append_kv(kc, vc, k, v, slot_mapping, layer=i)
        att = jpa.paged_prefill(q, kc, vc, block_tables, seq_lens, cu,
                                max_q_len=max_q_len, layer=i)
        x = x + reduce(att.reshape(x.shape[0], -1) @ lw["wo"])
        return _mlp(local, x, lw, reduce), kc, vc

    def layers_scan(x, k_cache, v_cache, lws, *step):
        def body(carry, xs):
            return layer(*carry, *xs, *step), None

        return jax.lax.scan(body, (x, k_cache, v_cache),
                            (jnp.arange(cfg.layers, dtype=jnp.int32), lws))[0]

    step = (meta.positions, meta.slot_mapping, meta.seq_lens, meta.cu_seqlens_q)
    if "layers" in params:
        if mesh is not None:
            raise ValueError("paged_forward: tensor parallelism takes stacked layer weights "
                             "(init_params / shard_params), not split_layers")
        for i, lw in enumerate(params["layers"]):
            x, k_cache, v_cache = layer(x, k_cache, v_cache, i, lw, *step)
    else:
        lws = {name: params[name] for name in _LAYER_KEYS}
        args = (x, k_cache, v_cache, lws, *step)
        if mesh is None:
            x, k_cache, v_cache = layers_scan(*args)
        else:
            rep, cache = P(), _CACHE_SPEC
            x, k_cache, v_cache = jax.shard_map(
                layers_scan, mesh=mesh,
                in_specs=(rep, cache, cache, dict(_LAYER_SPECS), rep, rep, rep, rep),
                out_specs=(rep, cache, cache))(*args)
    if logit_rows is not None:
        x = x[logit_rows]
    logits = rms_norm(x, params["final_norm"], cfg.eps) @ params["lm_head"]
    return logits.astype(jnp.float32), k_cache, v_cache


# ---- tensor parallelism (Megatron): column-parallel QKV / gate / up, row-parallel o / down;
# the stacked caches [L, P, page, Hkv, D] split on their KV-head axis.
_CACHE_SPEC = P(None, None, None, "tp", None)
_LAYER_SPECS = {"attn_norm": P(), "mlp_norm": P(), "wqkv": P(None, None, "tp"),
                "wo": P(None, "tp", None), "w_gate": P(None, None, "tp"),
                "w_up": P(None, None, "tp"), "w_down": P(None, "tp", None)}


def _qkv_by_device(cfg: Config, wqkv, tp: int):
    """Columns of the fused projection regrouped [q | k | v] per device, so a contiguous
    split over `tp` devices gives each its own q heads, KV heads and their V heads."""
    L, H = wqkv.shape[:2]
    w = wqkv.reshape(L, H, cfg.heads + 2 * cfg.kv_heads, cfg.head_dim)
    hq, hkv = cfg.heads // tp, cfg.kv_heads // tp
    q = w[:, :, :cfg.heads].reshape(L, H, tp, hq, cfg.head_dim)
    k = w[:, :, cfg.heads:cfg.heads + cfg.kv_heads].reshape(L, H, tp, hkv, cfg.head_dim)
    v = w[:, :, cfg.heads + cfg.kv_heads:].reshape(L, H, tp, hkv, cfg.head_dim)
    return jnp.concatenate([q, k, v], axis=3).reshape(L, H, -1)


def shard_params(params: dict, cfg: Config, mesh) -> dict:
    """`params` placed for `paged_forward(..., mesh=mesh)`: layer weights split Megatron-style
    over mesh axis "tp" (heads, KV heads and the MLP width must divide by it), the rest
    replicated."""
    tp = int(mesh.shape["tp"])
    for name, n in (("heads", cfg.heads), ("kv_heads", cfg.kv_heads), ("mlp", cfg.mlp)):
        if n % tp:
            raise ValueError(f"tensor parallelism: {name}={n} does not divide by tp={tp}")
    out = dict(params, wqkv=_qkv_by_device(cfg, params["wqkv"], tp))
    return {name: jax.device_put(x, NamedSharding(mesh, _LAYER_SPECS.get(name, P())))
            for name, x in out.items()}


def tp_mesh(n: int):
    """A mesh of the first `n` devices on axis "tp", or None for n <= 1."""
    if n <= 1:
        return None
    devices = jax.devices()
    if len(devices) < n:
        raise ValueError(f"--tp {n}: only {len(devices)} devices here")
    return jax.sharding.Mesh(np.array(devices[:n]), ("tp",))


def cache_sharding(mesh):
    """Sharding of the stacked caches under `paged_forward(..., mesh=mesh)`."""
    return NamedSharding(mesh, _CACHE_SPEC)


def dense_forward(params, cfg: Config, tokens):
    """Full recompute of one sequence [L] with dense causal attention; logits [L, V]."""
    n = tokens.shape[0]
    pos = jnp.arange(n, dtype=jnp.int32)
    x = params["embed"][tokens]
    group = cfg.heads // cfg.kv_heads
    mask = jnp.tril(jnp.ones((n, n), bool))
    for i in range(cfg.layers):
        lw = {name: params[name][i] for name in _LAYER_KEYS}
        h = rms_norm(x, lw["attn_norm"], cfg.eps)
        qkv = _rotated_qkv(cfg, h, lw["wqkv"], pos).reshape(n, -1, cfg.head_dim)
        q = qkv[:, :cfg.heads].astype(jnp.float32)
        k = jnp.repeat(qkv[:, cfg.heads:cfg.heads + cfg.kv_heads], group, 1).astype(jnp.float32)
        v = jnp.repeat(qkv[:, cfg.heads + cfg.kv_heads:], group, 1).astype(jnp.float32)
        s = jnp.einsum("qhd,khd->hqk", q, k, precision="highest") / jnp.sqrt(cfg.head_dim)
        p = jax.nn.softmax(jnp.where(mask[None], s, -jnp.inf), axis=-1)
        att = jnp.einsum("hqk,khd->qhd", p, v, precision="highest").astype(x.dtype)
        x = _mlp(cfg, x + att.reshape(n, -1) @ lw["wo"], lw)
    return (rms_norm(x, params["final_norm"], cfg.eps) @ params["lm_head"]).astype(jnp.float32)
