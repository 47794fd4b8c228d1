"""Size of the CUDA split-KV workspace, decided at trace time from static shapes only.

The CUDA lowering appends one extra uint8 output of this many bytes to the attention custom
calls (XLA allocates it, so the call stays CUDA-graph safe); the CPU lowering has none. The
launcher never uses more than it is given: it picks the number of KV splits to fit.
"""

from __future__ import annotations


def cuda_workspace_bytes(*, is_decode: bool, num_tokens: int, num_q_heads: int, head_dim: int,
                         batch: int, max_pages_per_req: int, page_size: int,
                         max_q_len: int) -> int:
    # Placeholder sizing owned by the CUDA kernels: room for up to 16 partial (out, m, l) states
    # per query row and head in float32. Never zero: XLA dislikes zero-size custom-call results.
    max_splits = 16 if is_decode else 1
    per_row = num_q_heads * (head_dim + 2) * 4
    return max(256, max_splits * num_tokens * per_row)
