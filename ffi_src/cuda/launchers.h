// Host entry points of the CUDA kernels. This header knows no XLA type: the FFI handlers in
// ffi_src/ffi/cuda_handlers.cc fill the params and call these.
#pragma once

#include <cuda_runtime_api.h>

#include "../common/params.h"

namespace jpa {

// Each launcher returns the first CUDA error it sees (launch or configuration) so the handler
// can report it; none of them synchronizes or reads device memory on the host.
cudaError_t LaunchPagedDecode(const AttnParams& p, cudaStream_t stream);
cudaError_t LaunchPagedPrefill(const AttnParams& p, cudaStream_t stream);
cudaError_t LaunchAppendKV(const AppendParams& p, cudaStream_t stream);

}  // namespace jpa
