// The CUDA attention kernels' 32-bit index limits, as facts about static shapes (every one is
// known when the call is traced): the CUDA lowering asks the extension module (module.cc,
// `gpu_shape_limit`) and raises the reason at trace time; the launcher checks the same
// function before it plans, in case a caller reaches it another way. Plain C++ (no CUDA
// headers): a CPU-only build lowers for CUDA too. Why each limit exists:
// docs/int64_audit.md (every address is int64; rows, keys and grid indices are int).
#pragma once

#include <cstdint>

#include "workspace.h"

namespace jpa {

constexpr int64_t kGpuMaxRows = (int64_t(1) << 31) - 1;     // num_tokens * num_q_heads
constexpr int64_t kGpuMaxBatch = 65535;                     // grid.y: one row per request
// A request's keys plus one key tile must fit an int; a valid request has
// seq_len <= max_pages_per_req * page_size, so that capacity is what is bounded.
constexpr int64_t kGpuMaxKeys = (int64_t(1) << 31) - (int64_t(1) << 16);
// grid.z = row blocks of the longest request: max_q_len * group rows in the tiles' blocks
// (ws::block_rows_for: 16 or 64 rows for short requests, else 128; 64 at head_dim 256).
constexpr int64_t kGpuMaxRowBlocks = 65535;

// Why a call with these shapes cannot run on the CUDA kernels, or nullptr if it can.
// `group` = num_q_heads / num_kv_heads; `max_q_len` = the longest request's query rows
// (q_len_per_req for decode).
inline const char* gpu_shape_limit(int64_t num_tokens, int64_t num_q_heads, int64_t group,
                                   int64_t head_dim, int64_t batch, int64_t max_pages_per_req,
                                   int64_t page_size, int64_t max_q_len) {
  if (num_tokens > 0 && num_q_heads > kGpuMaxRows / num_tokens)
    return "num_tokens * num_q_heads must be below 2**31";
  if (batch > kGpuMaxBatch) return "the batch (block_tables rows) must be at most 65535";
  if (page_size > kGpuMaxRows) return "page_size must be below 2**31";
  if (max_q_len > kGpuMaxRows) return "max_q_len must be below 2**31";
  if (page_size > 0 && max_pages_per_req > kGpuMaxKeys / page_size)
    return "the block table's capacity (max_pages_per_req * page_size) must be at most "
           "2**31 - 2**16 keys";
  const int64_t rows = max_q_len * group;  // both below 2**31: no int64 overflow
  int64_t bm = ws::block_rows_for(rows);
  if (head_dim == 256 && bm > 64) bm = 64;
  if ((rows + bm - 1) / bm > kGpuMaxRowBlocks)
    return "max_q_len * (num_q_heads / num_kv_heads) must be at most 65535 row blocks (of "
           "128 rows; 64 at head_dim 256)";
  return nullptr;
}

}  // namespace jpa
