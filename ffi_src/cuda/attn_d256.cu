// Tile-kernel instantiations for head_dim 256 (decode shape and prefill shape; bf16, f16 and
// fp8 pages). Kept in its own file so the head_dims compile in parallel.
#include "attn_tile.cuh"

namespace jpa {
namespace cuda {

cudaError_t attn_tiles_d256(const AttnLaunch* L, bool decode_shape, DType page_dtype,
                           TileInfo* info, dim3 grid, cudaStream_t stream) {
  // <D, decode WN, decode BN, prefill BN>
  return attn_tiles_dispatch<256, 2, 32, 32>(L, decode_shape, page_dtype, info, grid, stream);
}

}  // namespace cuda
}  // namespace jpa
