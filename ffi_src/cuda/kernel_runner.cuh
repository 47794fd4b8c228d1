// Launch helpers of one attention kernel configuration, shared by the kernel families: the
// facts the launcher plans with (TileInfo, from the occupancy calculator; also opts the
// kernel into its shared memory) and the launch itself. `Kernel` is the configuration's
// __global__ function; `Cfg` gives kThreads, kSmemBytes and BM.
#pragma once

#include <cuda_runtime_api.h>

#include "attn_common.cuh"
#include "cuda_utils.cuh"
#include "tile_families.h"

namespace jpa {
namespace cuda {

template <class Cfg, void (*Kernel)(const AttnLaunch)>
struct KernelRunner {
  static cudaError_t info(TileInfo* ti) {
    JPA_CUDA_TRY(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      Cfg::kSmemBytes));
    int occ = 0;
    JPA_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, Kernel, Cfg::kThreads,
                                                               Cfg::kSmemBytes));
    ti->threads = Cfg::kThreads;
    ti->smem_bytes = Cfg::kSmemBytes;
    ti->block_rows = Cfg::BM;
    ti->ctas_per_sm = occ;
    return cudaSuccess;
  }
  static cudaError_t launch(const AttnLaunch& L, dim3 grid, cudaStream_t stream) {
    Kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(L);
    return cudaGetLastError();
  }
};

// A runner's job for one call: only the launch facts (`L == nullptr`) or the launch.
template <class Runner>
cudaError_t info_or_launch(const AttnLaunch* L, TileInfo* info, dim3 grid,
                           cudaStream_t stream) {
  return L == nullptr ? Runner::info(info) : Runner::launch(*L, grid, stream);
}

}  // namespace cuda
}  // namespace jpa
