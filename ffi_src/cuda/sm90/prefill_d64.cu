// sm90 prefill instantiations for head_dim 64: bf16, f16 and fp8 pages, key tiles of 128, 3
// stages (fp8: + the 2-stage staging ring). Its own file so the head_dims compile in
// parallel.
#include "prefill_tile.cuh"

namespace jpa {
namespace cuda {

cudaError_t sm90_prefill_d64(const AttnLaunch* L, DType page_dtype, TileInfo* info, dim3 grid,
                            cudaStream_t stream) {
  return sm90::prefill_dispatch<64, 128, 3, 3>(L, page_dtype, info, grid, stream);
}

}  // namespace cuda
}  // namespace jpa
