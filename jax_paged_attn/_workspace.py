"""Size of the CUDA attention workspace, decided at trace time from static shapes only.

The CUDA lowering appends one extra uint8 output of this many bytes to the attention custom
calls (XLA allocates it, so the call stays CUDA-graph safe); the CPU lowering has none. Layout
(ffi_src/cuda/attn_common.cuh, keep the two in sync):

    [ReqMeta: 16 bytes per request][split lse: S*T*Hq f32][split out: S*T*Hq*D f32]

each region aligned to 256 bytes. The launcher picks the number of KV splits S from the SM
count, the kernel's occupancy and the grid the batch gives (at most `_MAX_TARGET_CTAS` CTAs
wanted), never more than `_MAX_SPLITS` or one per `_MIN_KEYS_PER_SPLIT` keys of the block
table's capacity, and never more than this workspace holds. This function reserves room for
the largest S the launcher could want on any GPU, so the launcher never has to settle for less.
"""

from __future__ import annotations

_ALIGN = 256
_META_BYTES_PER_REQ = 16
_MAX_SPLITS = 64
_MIN_KEYS_PER_SPLIT = 256
_MAX_TARGET_CTAS = 2048
# Packed (token, group head) rows per CTA of the tile shapes: <= 16 rows, <= 64 rows, more.
# (head_dim 256 uses 64 rows where the others use 128: fewer rows only mean fewer splits.)
_BLOCK_ROWS = (16, 64, 128)
_MAX_SPLIT_BYTES = 512 << 20  # never reserve more than this for split partials


def _align(x: int) -> int:
    return (x + _ALIGN - 1) // _ALIGN * _ALIGN


def _split_bytes(splits: int, rows: int, head_dim: int) -> int:
    if splits <= 1:
        return 0
    return _align(splits * rows * 4) + _align(splits * rows * head_dim * 4)


def cuda_splits_upper_bound(*, num_q_heads: int, batch: int, max_pages_per_req: int,
                            page_size: int, max_q_len: int,
                            num_kv_heads: int | None = None) -> int:
    """The most KV splits the CUDA launcher may choose for these static shapes."""
    if batch <= 0 or num_q_heads <= 0:
        return 1
    if num_kv_heads:
        group = num_q_heads // num_kv_heads
        rows = max_q_len * group
        bm = next((r for r in _BLOCK_ROWS if rows <= r), _BLOCK_ROWS[-1])
        base = batch * num_kv_heads * (-(-rows // bm))
    else:
        # Without the KV head count: the fewest CTAs any group size could give.
        base = batch * max(1, (max_q_len * num_q_heads) // _BLOCK_ROWS[-1])
    if base >= _MAX_TARGET_CTAS:
        return 1
    splits = -(-_MAX_TARGET_CTAS // base)
    splits = min(splits, _MAX_SPLITS, max(1, (max_pages_per_req * page_size) // _MIN_KEYS_PER_SPLIT))
    return max(1, splits)


def cuda_workspace_bytes(*, is_decode: bool, num_tokens: int, num_q_heads: int, head_dim: int,
                         batch: int, max_pages_per_req: int, page_size: int,
                         max_q_len: int, num_kv_heads: int | None = None) -> int:
    """Bytes of the workspace output of a CUDA decode/prefill call (never zero)."""
    del is_decode  # decode and prefill share the policy (decode: max_q_len = q_len_per_req)
    meta = _align(max(batch, 1) * _META_BYTES_PER_REQ)
    rows = num_tokens * num_q_heads
    splits = cuda_splits_upper_bound(num_q_heads=num_q_heads, batch=batch,
                                     max_pages_per_req=max_pages_per_req, page_size=page_size,
                                     max_q_len=max_q_len, num_kv_heads=num_kv_heads)
    while splits > 1 and _split_bytes(splits, rows, head_dim) > _MAX_SPLIT_BYTES:
        splits -= 1
    return meta + _split_bytes(splits, rows, head_dim)
