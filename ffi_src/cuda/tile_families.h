// What the launcher (attn_launch.cu) knows of the attention kernel families: the launch facts
// of a tile configuration, the tile shapes, and each family's entry points. The kernels
// themselves live in the family folders (sm80/: mma.sync + cp.async, built for sm_80 and
// sm_90; sm90/: wgmma, sm_90a); the launcher includes only this header, not the kernel
// templates.
#pragma once

#include <cuda_runtime_api.h>

#include "../common/dtypes.h"
#include "attn_common.cuh"

namespace jpa {
namespace cuda {

// Launch facts of one kernel configuration on the current device.
struct TileInfo {
  int threads = 0;
  int smem_bytes = 0;
  int block_rows = 0;   // BM
  int ctas_per_sm = 0;  // from the occupancy calculator
};

// Tile shapes of the sm80 family (rows of packed (token, group head) pairs per CTA):
//   kShapeDecode:    16 rows, 1 row of warps, the warps split each key tile (small row counts);
//   kShapePrefill64: 64 rows, 4 warps x 16 rows;
//   kShapePrefill128: 128 rows, 4 warps x 2 MMA row tiles (head_dim <= 128; 256 uses 64 rows).
enum TileShape : int { kShapeDecode = 0, kShapePrefill64 = 1, kShapePrefill128 = 2 };

// sm80 family, one entry point per head_dim (one .cu file each in sm80/, so the
// instantiations compile in parallel). `page_dtype` picks the compute dtype: bf16 pages ->
// bf16, f16 and fp8 pages -> f16. With `L == nullptr` only fills `info` (and sets the
// kernel's shared-memory limit).
cudaError_t attn_tiles_d64(const AttnLaunch* L, int shape, DType page_dtype, TileInfo* info,
                           dim3 grid, cudaStream_t stream);
cudaError_t attn_tiles_d128(const AttnLaunch* L, int shape, DType page_dtype, TileInfo* info,
                            dim3 grid, cudaStream_t stream);
cudaError_t attn_tiles_d256(const AttnLaunch* L, int shape, DType page_dtype, TileInfo* info,
                            dim3 grid, cudaStream_t stream);

// sm90 family (sm90/: wgmma, compiled for sm_90a only, present when JPA_WITH_SM90): prefill
// of bf16 / f16 pages, and of fp8 pages where sm90_takes_fp8 says so, one entry point per
// head_dim, 128 packed rows per CTA. Same contract as the sm80 entries (`L == nullptr`: fill
// `info` only).
cudaError_t sm90_prefill_d64(const AttnLaunch* L, DType page_dtype, TileInfo* info, dim3 grid,
                             cudaStream_t stream);
cudaError_t sm90_prefill_d128(const AttnLaunch* L, DType page_dtype, TileInfo* info, dim3 grid,
                              cudaStream_t stream);
cudaError_t sm90_prefill_d256(const AttnLaunch* L, DType page_dtype, TileInfo* info, dim3 grid,
                              cudaStream_t stream);

// Head dims whose sm90 entry takes fp8 e4m3 pages (widened to f16 by its load warpgroup);
// at 256 the fp8 staging ring does not fit in shared memory beside two stages.
constexpr bool sm90_takes_fp8(int head_dim) { return head_dim == 64 || head_dim == 128; }

}  // namespace cuda
}  // namespace jpa
