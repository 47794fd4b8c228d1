// Hopper-only PTX (sm_90a) the sm90 family uses beside the generated MMA wrappers
// (wgmma_ops.cuh): shared-memory matrix descriptors, the warpgroup MMA fences, the proxy
// fence between threads' shared-memory writes and the MMA unit's reads, mbarriers, named
// barriers and the warpgroup register hand-over.
#pragma once

#include <cstdint>

namespace jpa {
namespace cuda {
namespace sm90 {

// Tiles the MMAs read are stored in 128-byte-swizzle atoms: 8 rows of 128 bytes (64 16-bit
// values), 1024 bytes, with 16-byte chunk c of row r at chunk c ^ (r % 8). A [rows][D] tile
// is D / 64 column blocks of `rows` rows each; every atom starts on a 1024-byte boundary.
__device__ __forceinline__ uint32_t sw128_offset(int rows, int row, int chunk) {
  return uint32_t((chunk >> 3) * rows * 128 + row * 128 + (((chunk & 7) ^ (row & 7)) << 4));
}

// 64-bit descriptor of a shared-memory operand in 128-byte-swizzle atoms (PTX ISA, "matrix
// descriptor"): start address, leading and stride byte offsets (all in 16-byte units, 14
// bits each), swizzle mode 1 = 128 bytes, base offset 0 (atoms 1024-byte aligned).
//   K-major operand (rows along M or N, 16-bit values along K): stride = 1024 bytes from one
//   8-row group to the next; leading unused (1). A k16 step inside a column block advances
//   the start by 32 bytes, the next column block by rows * 128.
//   MN-major operand (values along N contiguous, K = rows): leading = bytes from one
//   64-value column block to the next (rows * 128), stride = 1024 (next 8 rows of K).
__device__ __forceinline__ uint64_t sw128_desc(uint32_t smem_addr, uint32_t leading_bytes,
                                               uint32_t stride_bytes) {
  return uint64_t((smem_addr & 0x3ffffu) >> 4) | (uint64_t((leading_bytes >> 4) & 0x3fffu) << 16) |
         (uint64_t((stride_bytes >> 4) & 0x3fffu) << 32) | (uint64_t(1) << 62);
}

// The descriptor of the matrix `bytes` further on in shared memory: only the start address
// field (bits 0-13, address / 16) moves, and no carry can leave it (shared addresses are below
// 2^18 bytes), so one 32-bit add of the low word replaces the field's masking, shift and
// merge per MMA.
__device__ __forceinline__ uint64_t desc_advance(uint64_t desc, uint32_t bytes) {
  const uint32_t lo = uint32_t(desc) + (bytes >> 4);
  return (desc & 0xffffffff00000000ull) | lo;
}

// Orders this thread's earlier register and shared-memory accesses before the warpgroup's
// next MMAs (required before an MMA whose accumulators or A registers were just written).
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

// Waits until at most N committed MMA groups of the warpgroup are pending.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// The MMA writes its accumulators asynchronously, but the compiler sees them written by the
// issuing asm. After wgmma_wait this empty asm "redefines" each register, so no read of the
// accumulators is moved above the wait; before wgmma_fence it keeps the last ordinary writes
// of accumulators and A registers above the fence.
template <int N>
__device__ __forceinline__ void fence_registers(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

template <int N, int K>
__device__ __forceinline__ void fence_registers(uint32_t (&r)[N][K]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int k = 0; k < K; ++k) asm volatile("" : "+r"(r[i][k])::"memory");
}

// Shared memory written by threads (cp.async, st.shared) becomes visible to the MMA unit's
// reads (the async proxy) only after this fence, then a barrier.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// ---- mbarriers (shared-memory arrive/wait barriers) and named barriers -----------------------

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// Arrive (release at CTA scope): this thread's earlier memory accesses happen before the
// phase completes for the waiters.
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// Waits (acquire) until the barrier's phase of parity `parity` has completed. Every lane of
// the calling warp must call it.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
  // The lanes may leave the loop at different times; the callers go on to .aligned
  // instructions (bar.sync, wgmma.fence) that need the whole warp together.
  __syncwarp();
}

// Named barriers 1..15 over `count` threads (a multiple of 32; barrier 0 is __syncthreads).
// bar_sync waits for `count` arrivals including its own; bar_arrive only counts itself.
__device__ __forceinline__ void bar_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

__device__ __forceinline__ void bar_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

// Moves registers between the warpgroups of a warp-specialized CTA: a warpgroup that only
// copies gives registers back, the MMA warpgroups take them (all 128 threads execute it).
template <int N>
__device__ __forceinline__ void regs_dealloc() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

template <int N>
__device__ __forceinline__ void regs_alloc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

}  // namespace sm90
}  // namespace cuda
}  // namespace jpa
