"""A continuous-batching generation engine over examples/llama.py and a paged cache.

Each step packs, up to a token budget, one decode token of every running request and chunks
of waiting prompts (chunked prefill) into one batch; one jitted step appends their K/V,
attends over the paged cache (a mixed prefill + decode `paged_prefill` per layer) and samples
greedily. A finished request frees its pages and a waiting one takes them. Admission is
conservative: a request enters only when the pool can hold its prompt plus all its output,
so a running request never runs out of pages (no preemption needed).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_paged_attn.cache import PageAllocator

import llama


@dataclasses.dataclass
class Request:
    rid: int
    prompt: list
    max_new: int
    arrival: float = 0.0          # seconds after the engine starts (or a step index)
    cached: int = 0               # tokens in the cache
    output: list = dataclasses.field(default_factory=list)
    token_times: list = dataclasses.field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.output) >= self.max_new

    @property
    def in_prefill(self) -> bool:
        return self.cached < len(self.prompt)


class Engine:
    def __init__(self, params, cfg: llama.Config, *, num_pages: int, page_size: int,
                 max_batch: int, token_budget: int, max_seq_len: int, chunk: int,
                 cache_fill: float = 0.0, mesh=None):
        """`mesh`: run tensor-parallel over its axis "tp" (llama.paged_forward): the weights
        are placed with llama.shard_params and the caches split on their KV-head axis."""
        # Layers unrolled over separate weight arrays on one device (llama.split_layers);
        # stacked and scanned under tensor parallelism.
        params = (llama.split_layers(params) if mesh is None
                  else llama.shard_params(params, cfg, mesh))
        self.params, self.cfg = params, cfg
        self.page_size, self.max_batch, self.budget, self.chunk = (page_size, max_batch,
                                                                   token_budget, chunk)
        self.max_pages = -(-max_seq_len // page_size)
        # A step's token axis is padded to the smallest of these lengths that holds its
        # tokens (one compilation each): a decode-only step must not run the model over a
        # whole prefill budget of padding.
        self.buckets = sorted({min(token_budget, max_batch),
                               min(token_budget, chunk + max_batch), token_budget})
        self.alloc = PageAllocator(num_pages, page_size)
        dt = jnp.dtype(cfg.dtype)
        shape = (cfg.layers, num_pages, page_size, cfg.kv_heads, cfg.head_dim)
        # Slots no request has written are never read; tests fill them with NaN to show it.
        self.k_cache = jnp.full(shape, cache_fill, dt)
        self.v_cache = jnp.full(shape, cache_fill, dt)
        if mesh is not None:
            self.k_cache = jax.device_put(self.k_cache, llama.cache_sharding(mesh))
            self.v_cache = jax.device_put(self.v_cache, llama.cache_sharding(mesh))
        self.running: list[Request] = []
        self.waiting: list[Request] = []
        self.finished: list[Request] = []
        self.steps = 0
        step = functools.partial(self._device_step, cfg, page_size)
        self._step = jax.jit(functools.partial(step, min(chunk, token_budget), mesh),
                             donate_argnums=(1, 2))
        # A step whose requests bring at most one token each (decode only) runs with
        # max_q_len 1: the kernels then pick their decode tiles, not a prefill tile of
        # 64-128 rows per request of which G rows are used.
        self._decode_step = jax.jit(functools.partial(step, 1, mesh), donate_argnums=(1, 2))

    @staticmethod
    def _device_step(cfg, page_size, max_q_len, mesh, params, k_cache, v_cache, tokens,
                     block_tables, start, num_new):
        last = jnp.clip(jnp.cumsum(num_new) - 1, 0, tokens.shape[0] - 1)   # each request's
        logits, k_cache, v_cache = llama.paged_forward(                  # last new token
            params, cfg, tokens, k_cache, v_cache, block_tables, start, num_new,
            page_size=page_size, max_q_len=max_q_len, mesh=mesh, logit_rows=last)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), k_cache, v_cache

    def submit(self, req: Request):
        if len(req.prompt) + req.max_new > self.max_pages * self.page_size:
            raise ValueError(f"request {req.rid}: {len(req.prompt)} + {req.max_new} tokens "
                             f"exceed max_seq_len")
        self.waiting.append(req)

    def _admit(self, now):
        while (self.waiting and len(self.running) < self.max_batch
               and self.waiting[0].arrival <= now):
            req = self.waiting[0]
            if not self.alloc.can_reserve(req.rid, len(req.prompt) + req.max_new):
                break                                     # back-pressure: wait for frees
            self.alloc.reserve(req.rid, len(req.prompt) + req.max_new)
            self.running.append(self.waiting.pop(0))

    def _schedule(self):
        """(request, new tokens) pairs within the budget: decode tokens first, then prompt
        chunks in arrival order."""
        plan, budget = [], self.budget
        for req in self.running:
            if not req.in_prefill and budget > 0:
                plan.append((req, [req.output[-1]]))
                budget -= 1
        for req in self.running:
            if req.in_prefill and budget > 0:
                n = min(self.chunk, len(req.prompt) - req.cached, budget)
                plan.append((req, req.prompt[req.cached:req.cached + n]))
                budget -= n
        return plan

    def step(self, now=None):
        """One engine step; returns the number of tokens processed (0: nothing runnable)."""
        now = self.steps if now is None else now
        self._admit(now)
        plan = self._schedule()
        if not plan:
            return 0
        B = self.max_batch
        T = next(n for n in self.buckets if n >= sum(len(new) for _, new in plan))
        tokens = np.zeros(T, np.int32)
        start = np.zeros(B, np.int32)
        num_new = np.zeros(B, np.int32)
        order = [None] * B
        t = 0
        for b, (req, new) in enumerate(plan):
            tokens[t:t + len(new)] = new
            start[b], num_new[b], order[b] = req.cached, len(new), req.rid
            t += len(new)
        table = self.alloc.block_tables(order, self.max_pages)
        fn = self._decode_step if all(len(new) <= 1 for _, new in plan) else self._step
        sampled, self.k_cache, self.v_cache = fn(
            self.params, self.k_cache, self.v_cache, jnp.asarray(tokens), jnp.asarray(table),
            jnp.asarray(start), jnp.asarray(num_new))
        sampled = np.asarray(sampled)
        stamp = time.perf_counter()
        for b, (req, new) in enumerate(plan):
            req.cached += len(new)
            if not req.in_prefill:                 # the last prompt chunk, or a decode token
                req.output.append(int(sampled[b]))
                req.token_times.append(stamp)
        for req in [r for r in self.running if r.done]:
            self.running.remove(req)
            self.alloc.free(req.rid)
            self.finished.append(req)
        self.steps += 1
        return t

    def compile_buckets(self):
        """Compiles the step for every token bucket (a step with no tokens: nothing is
        written or read), so timed runs exclude compilation."""
        table = jnp.zeros((self.max_batch, self.max_pages), jnp.int32)
        zeros = jnp.zeros((self.max_batch,), jnp.int32)
        # decode-only steps hold at most max_batch tokens: the smallest bucket
        for fn, n in [(self._step, n) for n in self.buckets] + [(self._decode_step,
                                                                 self.buckets[0])]:
            _, self.k_cache, self.v_cache = fn(
                self.params, self.k_cache, self.v_cache, jnp.zeros((n,), jnp.int32), table,
                zeros, zeros)
        jax.block_until_ready(self.k_cache)

    def idle(self) -> bool:
        return not self.running and not self.waiting


def greedy_reference(params, cfg, prompt, max_new, pad_to):
    """Greedy tokens of one request by full recompute with dense attention. The sequence is
    padded to `pad_to` tokens (causal: padding after a position cannot change it), so one
    compilation serves every length."""
    fwd = jax.jit(lambda p, tokens: llama.dense_forward(p, cfg, tokens))
    seq = list(prompt)
    for _ in range(max_new):
        padded = np.zeros(pad_to, np.int32)
        padded[:len(seq)] = seq
        seq.append(int(jnp.argmax(fwd(params, jnp.asarray(padded))[len(seq) - 1])))
    return seq[len(prompt):]
