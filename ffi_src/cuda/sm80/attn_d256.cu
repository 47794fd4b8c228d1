// Tile-kernel instantiations for head_dim 256 (decode and prefill tile shapes; bf16, f16 and
// fp8 pages). Kept in its own file so the head_dims compile in parallel.
#include "attn_tile.cuh"

namespace jpa {
namespace cuda {

cudaError_t attn_tiles_d256(const AttnLaunch* L, int shape, DType page_dtype,
                           TileInfo* info, dim3 grid, cudaStream_t stream) {
  // <D, decode WN, decode BN, prefill BN, 128-row shape BN (0: none)>
  return attn_tiles_dispatch<256, 2, 32, 32, 0>(L, shape, page_dtype, info, grid, stream);
}

}  // namespace cuda
}  // namespace jpa
