// Phase stamps of the attention tile CTAs (sm80 tiles and the sm90 prefill kernel), for a
// diagnostic build only (CMake -DJPA_TIMELINE=ON): each CTA's thread 0 takes clock64() at a few
// points of its work and prints one line when it ends, which benchmarks/kernel_timeline.py
// reads. In the normal build every call here is empty and the kernels are unchanged.
//
// Why: the fit of run 10 gives each sm90 prefill CTA about 10.5 us of time that does not
// scale with its key tiles (1.72 us each), and decode at 1x32768 (one wave of split CTAs)
// reaches 73.5% of the read ceiling; ncu's source counters cannot say which part of a CTA's
// life the time is in (start, Q staging, the first tile's wait, the tile loop, the epilogue,
// an SM idle before its next CTA or after its last). These stamps can, with the global timer
// for the SMs' idle time.
#pragma once

#include <cstdint>
#include <cstdio>

#ifndef JPA_TIMELINE
#define JPA_TIMELINE 0
#endif

namespace jpa {
namespace cuda {

enum TimelineMark : int {
  kTlStart = 0,  // kernel entry (an sm90 CTA's second item: its start)
  kTlQ,          // Q staged (sm90: both MMA warpgroups passed the Q barrier; sm80: thread 0's
                 // share stored)
  kTlTile0,      // tile 0 landed (sm90: its full barrier passed; sm80: its first barrier)
  kTlLoop,       // the tile loop done
  kTlEnd,        // the epilogue's stores issued (sm80: after a fused merge, if any)
  kTlMarks
};

struct Timeline {
#if JPA_TIMELINE
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
  // One line per CTA (per item): "jpa-tl smid x y z ntiles ns_start ns_end clk[0..4]".
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

}  // namespace cuda
}  // namespace jpa
