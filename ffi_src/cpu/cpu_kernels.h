// Reference-quality CPU kernels (plain loops, float32 math) behind the CPU FFI handlers.
// They read the same params structs and shared index/mask helpers as the CUDA kernels.
#pragma once

#include "../common/params.h"

namespace jpa {

void RunAttentionCpu(const AttnParams& p);
void RunAppendCpu(const AppendParams& p);

}  // namespace jpa
