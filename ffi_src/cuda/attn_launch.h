// Internal launch functions of the attention pipeline (see attn_common.cuh for the flow).
#pragma once

#include <cuda_runtime_api.h>

#include "attn_common.cuh"

namespace jpa {
namespace cuda {

cudaError_t launch_attn_prepare(const AttnLaunch& L, cudaStream_t stream);
cudaError_t launch_attn_merge(const AttnLaunch& L, cudaStream_t stream);

}  // namespace cuda
}  // namespace jpa
