// Phase stamps of the sm90 prefill CTAs, for a diagnostic build only (CMake
// -DJPA_SM90_TIMELINE=ON): each CTA's first MMA thread takes clock64() at a few points of its
// work and prints one line when it ends, which benchmarks/prefill_timeline.py reads. In the normal
// build every call here is empty and the kernels are unchanged.
//
// Why: the fit of run 10 gives each CTA about 10.5 us of time that does not scale with its key
// tiles (1.72 us each), and ncu's source counters cannot say which part of a CTA's life it is
// (start, Q staging, the first tile's wait, the epilogue, the gap before the next CTA on the
// SM). These stamps can: the time from the start to Q staged, from there to tile 0 landed
// (zero-ish if the loader's K / V were there first), the tile loop, the epilogue, and, from
// the global timer, the gaps between consecutive CTAs of one SM.
#pragma once

#include <cstdint>
#include <cstdio>

#ifndef JPA_SM90_TIMELINE
#define JPA_SM90_TIMELINE 0
#endif

namespace jpa {
namespace cuda {
namespace sm90 {

enum TimelineMark : int {
  kTlStart = 0,  // kernel entry
  kTlQ,          // Q staged (both MMA warpgroups passed the Q barrier)
  kTlTile0,      // tile 0 landed (its full barrier passed)
  kTlLoop,       // the last P V waited for
  kTlEnd,        // the epilogue's stores issued
  kTlMarks
};

struct Timeline {
#if JPA_SM90_TIMELINE
  long long clk[kTlMarks] = {};
  unsigned long long ns_start = 0;

  __device__ __forceinline__ static unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
  }
  __device__ __forceinline__ void mark(int m) {
    clk[m] = clock64();
    if (m == kTlStart) ns_start = global_ns();
  }
  // One line per CTA: "jpa-tl smid x y z ntiles ns_start ns_end clk[0..4]".
  __device__ __forceinline__ void print(int ntiles) const {
    unsigned smid;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
    printf("jpa-tl %u %u %u %u %d %llu %llu %lld %lld %lld %lld %lld\n", smid, blockIdx.x,
           blockIdx.y, blockIdx.z, ntiles, ns_start, global_ns(), clk[0], clk[1], clk[2],
           clk[3], clk[4]);
  }
#else
  __device__ __forceinline__ void mark(int) {}
  __device__ __forceinline__ void print(int) const {}
#endif
};

}  // namespace sm90
}  // namespace cuda
}  // namespace jpa
