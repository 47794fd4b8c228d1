// Tile-kernel instantiations for head_dim 128 (decode shape and prefill shape; bf16, f16 and
// fp8 pages). Kept in its own file so the head_dims compile in parallel.
#include "attn_tile.cuh"

namespace jpa {
namespace cuda {

cudaError_t attn_tiles_d128(const AttnLaunch* L, bool decode_shape, DType page_dtype,
                           TileInfo* info, dim3 grid, cudaStream_t stream) {
  // <D, decode WN, decode BN, prefill BN>
  return attn_tiles_dispatch<128, 4, 64, 64>(L, decode_shape, page_dtype, info, grid, stream);
}

}  // namespace cuda
}  // namespace jpa
