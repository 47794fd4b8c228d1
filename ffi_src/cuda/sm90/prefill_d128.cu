// sm90 prefill instantiations for head_dim 128 (bf16 and f16 pages): key tiles of 128, 3
// stages. Its own file so the head_dims compile in parallel.
#include "prefill_tile.cuh"

namespace jpa {
namespace cuda {

cudaError_t sm90_prefill_d128(const AttnLaunch* L, DType page_dtype, TileInfo* info, dim3 grid,
                            cudaStream_t stream) {
  return sm90::prefill_dispatch<128, 128, 3>(L, page_dtype, info, grid, stream);
}

}  // namespace cuda
}  // namespace jpa
