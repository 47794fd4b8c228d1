"""The baseline the paged engine is measured against: the same model (llama.py, same weights)
served the way JAX GPU code does it without paging. Each batch slot owns a dense KV cache
padded to the longest sequence, one `[slots, max_len, Hkv, D]` array per layer; a new
request is prefilled alone (its prompt padded to a power-of-two bucket, one compilation per
bucket), then every step decodes one token for all slots with `jax.nn.dot_product_attention`
over the padded cache (cuDNN where it applies), lengths given as `key_value_seq_lengths`.

The decode step runs its layers unrolled over separate weight and cache arrays, as the paged
engine does (llama.split_layers says why). A `lax.scan` carrying the stacked cache also
makes XLA pick the layout cuDNN wants for the whole carried stack and transpose all of it
(18 GB at Llama-3-8B shapes, 64 slots of 4608) around the loop: out of memory on an H200.
The prefill keeps the scan over stacked weights: it is compute-bound, and one compilation of
a scanned layer per bucket keeps its warm-up short.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import llama


def _attention(q, k, v, kv_lengths, causal, implementation):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                        key_value_seq_lengths=kv_lengths,
                                        implementation=implementation)


def prefill(params, cfg, tokens, length, implementation=None):
    """One request's prompt `tokens` [S] (first `length` real). Returns the last real
    position's logits [V] and its K, V [layers, S, Hkv, D]."""
    s = tokens.shape[0]
    pos = jnp.arange(s, dtype=jnp.int32)
    x = params["embed"][tokens]

    def layer(x, lw):
        h = llama.rms_norm(x, lw["attn_norm"], cfg.eps)
        qkv = llama._rotated_qkv(cfg, h, lw["wqkv"], pos).reshape(s, -1, cfg.head_dim)
        q = qkv[:, :cfg.heads]
        k = qkv[:, cfg.heads:cfg.heads + cfg.kv_heads]
        v = qkv[:, cfg.heads + cfg.kv_heads:]
        att = _attention(q[None], k[None], v[None], jnp.reshape(length, (1,)), True,
                         implementation)[0]
        x = x + att.reshape(s, -1) @ lw["wo"]
        return llama._mlp(cfg, x, lw), (k, v)

    layers = {n: params[n] for n in llama._LAYER_KEYS}
    x, (ks, vs) = jax.lax.scan(layer, x, layers)
    x = llama.rms_norm(x[length - 1], params["final_norm"], cfg.eps)
    return (x @ params["lm_head"]).astype(jnp.float32), ks, vs


def decode(params, cfg, tokens, positions, k_caches, v_caches, implementation=None):
    """One token per slot: tokens/positions [B]; `params` as llama.split_layers makes them;
    caches: one [B, max_len, Hkv, D] array per layer (updated at `positions`). Returns
    (logits [B, V], k_caches, v_caches)."""
    b = tokens.shape[0]
    x = params["embed"][tokens]
    rows = jnp.arange(b)
    k_out, v_out = [], []
    for lw, kc, vc in zip(params["layers"], k_caches, v_caches):
        h = llama.rms_norm(x, lw["attn_norm"], cfg.eps)
        qkv = llama._rotated_qkv(cfg, h, lw["wqkv"], positions).reshape(b, -1, cfg.head_dim)
        q = qkv[:, :cfg.heads]
        kc = kc.at[rows, positions].set(qkv[:, cfg.heads:cfg.heads + cfg.kv_heads])
        vc = vc.at[rows, positions].set(qkv[:, cfg.heads + cfg.kv_heads:])
        att = _attention(q[:, None], kc, vc, positions + 1, False, implementation)
        x = llama._mlp(cfg, x + att.reshape(b, -1) @ lw["wo"], lw)
        k_out.append(kc)
        v_out.append(vc)
    logits = llama.rms_norm(x, params["final_norm"], cfg.eps) @ params["lm_head"]
    return logits.astype(jnp.float32), tuple(k_out), tuple(v_out)


class DenseEngine:
    """Slots with dense caches; requests (engine.Request) prefilled alone, decoded together."""

    def __init__(self, params, cfg, *, slots: int, max_seq_len: int, implementation=None):
        self.params, self.cfg, self.slots, self.max_len = params, cfg, slots, max_seq_len
        self.split = llama.split_layers(params)
        shape = (slots, max_seq_len, cfg.kv_heads, cfg.head_dim)
        dt = jnp.dtype(cfg.dtype)
        self.k_cache = tuple(jnp.zeros(shape, dt) for _ in range(cfg.layers))
        self.v_cache = tuple(jnp.zeros(shape, dt) for _ in range(cfg.layers))
        self.slot_req = [None] * slots
        self.waiting, self.finished = [], []
        self.steps = 0
        # The weights are an argument, never a closure: a closed-over array is baked into
        # the executable as a constant (16 GB for Llama-3-8B, compiled once per bucket).
        self._prefill = jax.jit(lambda p, tokens, length: prefill(
            p, cfg, tokens, length, implementation=implementation))
        self._decode = jax.jit(lambda p, tokens, pos, kc, vc: decode(
            p, cfg, tokens, pos, kc, vc, implementation=implementation),
            donate_argnums=(3, 4))
        # a prefilled request's K, V [layers, S, Hkv, D] into slot s of each layer's cache
        self._store = jax.jit(lambda kc, vc, k, v, s: (
            tuple(jax.lax.dynamic_update_index_in_dim(c, k[i], s, 0) for i, c in enumerate(kc)),
            tuple(jax.lax.dynamic_update_index_in_dim(c, v[i], s, 0) for i, c in enumerate(vc))),
            donate_argnums=(0, 1))

    def submit(self, req):
        self.waiting.append(req)

    def idle(self):
        return not self.waiting and all(r is None for r in self.slot_req)

    def step(self, now=None):
        now = self.steps if now is None else now
        work = 0
        for s in range(self.slots):                   # admit: prefill alone, per request
            if self.slot_req[s] is None and self.waiting and self.waiting[0].arrival <= now:
                req = self.waiting.pop(0)
                n = len(req.prompt)
                bucket = min(self.max_len, max(16, 1 << (n - 1).bit_length()))
                toks = np.zeros(bucket, np.int32)
                toks[:n] = req.prompt
                logits, k, v = self._prefill(self.params, jnp.asarray(toks), jnp.int32(n))
                pad = ((0, 0), (0, self.max_len - bucket), (0, 0), (0, 0))
                self.k_cache, self.v_cache = self._store(
                    self.k_cache, self.v_cache, jnp.pad(k, pad), jnp.pad(v, pad), s)
                req.cached = n
                req.output.append(int(jnp.argmax(logits)))
                req.token_times.append(time.perf_counter())
                self.slot_req[s] = req
                work += n
        self._retire()
        live = [s for s, r in enumerate(self.slot_req) if r is not None]
        if live:
            tokens = np.zeros(self.slots, np.int32)
            pos = np.zeros(self.slots, np.int32)
            for s in live:
                tokens[s], pos[s] = self.slot_req[s].output[-1], self.slot_req[s].cached
            logits, self.k_cache, self.v_cache = self._decode(
                self.split, jnp.asarray(tokens), jnp.asarray(pos), self.k_cache, self.v_cache)
            nxt = np.asarray(jnp.argmax(logits, axis=-1))
            stamp = time.perf_counter()
            for s in live:
                req = self.slot_req[s]
                req.cached += 1
                req.output.append(int(nxt[s]))
                req.token_times.append(stamp)
            work += len(live)
            self._retire()
        self.steps += 1
        return work

    def _retire(self):
        for s, req in enumerate(self.slot_req):
            if req is not None and req.done:
                self.finished.append(req)
                self.slot_req[s] = None
