// sm90 prefill instantiations for head_dim 128: bf16 and f16 pages with key tiles of 128 and
// 3 stages, fp8 pages with 2 (+ the 2-stage staging ring). Its own file so the head_dims
// compile in parallel.
#include "prefill_tile.cuh"

namespace jpa {
namespace cuda {

cudaError_t sm90_prefill_d128(const AttnLaunch* L, DType page_dtype, TileInfo* info, dim3 grid,
                            cudaStream_t stream) {
  return sm90::prefill_dispatch<128, 128, 3, 2>(L, page_dtype, info, grid, stream);
}

}  // namespace cuda
}  // namespace jpa
