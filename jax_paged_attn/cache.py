"""Serving helpers (no kernels): a host-side page allocator for requests, and a device-side
builder of one step's metadata (`seq_lens`, `cu_seqlens_q`, `slot_mapping`, positions) from
per-request positions, so a serving loop never computes slots by hand.

    alloc = PageAllocator(num_pages=4096, page_size=16)
    alloc.reserve(req_id, new_len)                  # grow a request's pages (or raise)
    table = alloc.block_tables([a, b, c], max_pages=256)     # int32 [B, max_pages]
    meta = step_metadata(table, start, num_new, num_tokens=T, page_size=16)   # jittable
    ...
    alloc.free(req_id)                              # pages go back to the pool
"""

from __future__ import annotations

from typing import Hashable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class PoolExhausted(RuntimeError):
    """Raised by `PageAllocator.reserve` when the pool has too few free pages; nothing was
    allocated (back-pressure: finish or evict a request, then retry)."""


class PageAllocator:
    """Hands out pages of one cache pool to requests; a page is owned by at most one request.

    Pages are handed out lowest index first from a free list, and a freed request's pages go
    back to it, so the pool is reused as requests come and go. Everything is host-side
    Python: call it between jitted steps, then pass `block_tables(...)` to the step.
    """

    def __init__(self, num_pages: int, page_size: int):
        if int(num_pages) < 0 or int(page_size) < 1:
            raise ValueError(f"PageAllocator: need num_pages >= 0 and page_size >= 1, got "
                             f"{num_pages}, {page_size}")
        self.num_pages = int(num_pages)
        self.page_size = int(page_size)
        self._free = list(range(self.num_pages - 1, -1, -1))   # a stack: pop() gives lowest
        self._owned: dict[Hashable, list[int]] = {}

    # ---- queries
    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_needed(self, num_tokens: int) -> int:
        return -(-int(num_tokens) // self.page_size)

    def pages(self, request) -> list[int]:
        """The request's pages in key order (empty for an unknown request)."""
        return list(self._owned.get(request, ()))

    def can_reserve(self, request, num_tokens: int) -> bool:
        """Whether `reserve(request, num_tokens)` would succeed."""
        have = len(self._owned.get(request, ()))
        return self.pages_needed(num_tokens) - have <= len(self._free)

    @property
    def requests(self) -> list:
        return list(self._owned)

    # ---- changes
    def reserve(self, request, num_tokens: int) -> list[int]:
        """Grows `request`'s pages to hold `num_tokens` keys (a new request starts empty).
        Returns its pages; raises PoolExhausted, changing nothing, when too few are free."""
        if int(num_tokens) < 0:
            raise ValueError(f"PageAllocator.reserve: num_tokens {num_tokens} is negative")
        owned = self._owned.get(request, [])
        more = self.pages_needed(num_tokens) - len(owned)
        if more > len(self._free):
            raise PoolExhausted(
                f"PageAllocator: request {request!r} needs {more} more page(s) for "
                f"{num_tokens} tokens but only {len(self._free)} of {self.num_pages} are free")
        owned = owned + [self._free.pop() for _ in range(max(more, 0))]
        self._owned[request] = owned
        return list(owned)

    def free(self, request) -> int:
        """Returns `request`'s pages to the pool; returns how many. Unknown requests: 0."""
        pages = self._owned.pop(request, [])
        # Keep the free stack sorted so allocation stays lowest-index-first.
        self._free = sorted(self._free + pages, reverse=True)
        return len(pages)

    def block_tables(self, requests: Iterable, max_pages: int, fill: int = -1) -> np.ndarray:
        """int32 [len(requests), max_pages]: each request's pages, then `fill` (an entry no
        key reaches is never read; -1 makes a mistaken read show as NaN rows). A request
        id of None gives a row of `fill` (an empty batch slot)."""
        requests = list(requests)
        table = np.full((len(requests), int(max_pages)), int(fill), np.int32)
        for row, req in enumerate(requests):
            pages = self._owned.get(req, []) if req is not None else []
            if len(pages) > max_pages:
                raise ValueError(f"PageAllocator.block_tables: request {req!r} holds "
                                 f"{len(pages)} pages, more than max_pages={max_pages}")
            table[row, :len(pages)] = pages
        return table


class StepMetadata(NamedTuple):
    """Metadata of one step, all device arrays (see `step_metadata`)."""

    seq_lens: jax.Array       # int32 [B]: start + num_new
    cu_seqlens_q: jax.Array   # int32 [B+1]
    slot_mapping: jax.Array   # int32 [T]: slot of each new token, -1 for padding tokens
    positions: jax.Array      # int32 [T]: position of each new token (0 for padding)
    request: jax.Array        # int32 [T]: request of each new token (B for padding)


def step_metadata(block_tables, start, num_new, *, num_tokens: int, page_size: int):
    """One step's metadata from per-request positions (jittable, no host round trip).

    Request b already has `start[b]` tokens cached and brings `num_new[b]` new ones, packed
    in batch order into a token axis of static length `num_tokens` (>= sum(num_new); the
    rest is padding). `block_tables` int32 [B, max_pages] must hold the pages of positions
    up to `start + num_new` (PageAllocator.reserve does that).
    """
    block_tables = jnp.asarray(block_tables, jnp.int32)
    start = jnp.asarray(start, jnp.int32)
    num_new = jnp.asarray(num_new, jnp.int32)
    b = block_tables.shape[0]
    cu = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(num_new, dtype=jnp.int32)])
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    req = jnp.searchsorted(cu, t, side="right").astype(jnp.int32) - 1
    real = t < cu[b]
    req_c = jnp.clip(req, 0, max(b - 1, 0))
    pos = start[req_c] + t - cu[req_c]
    col = jnp.clip(pos // page_size, 0, block_tables.shape[1] - 1)
    page = block_tables[req_c, col]
    slot = page * page_size + pos % page_size
    return StepMetadata(seq_lens=start + num_new, cu_seqlens_q=cu,
                        slot_mapping=jnp.where(real & (page >= 0), slot, -1),
                        positions=jnp.where(real, pos, 0), request=jnp.where(real, req_c, b))
