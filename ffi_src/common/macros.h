// Portability macros shared by the CPU (host compiler) and CUDA (nvcc) builds.
#pragma once

#if defined(__CUDACC__)
#define JPA_HD __host__ __device__ __forceinline__
#else
#define JPA_HD inline
#endif
