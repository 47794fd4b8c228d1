// sm90 prefill instantiations for head_dim 256 (bf16 and f16 pages; fp8 stays on sm80): key
// tiles of 64, 2 stages. Its own file so the head_dims compile in parallel.
#include "prefill_tile.cuh"

namespace jpa {
namespace cuda {

cudaError_t sm90_prefill_d256(const AttnLaunch* L, DType page_dtype, TileInfo* info, dim3 grid,
                            cudaStream_t stream) {
  return sm90::prefill_dispatch<256, 64, 2, 0>(L, page_dtype, info, grid, stream);
}

}  // namespace cuda
}  // namespace jpa
