// Device properties read once per device and cached (host only; touches no device memory,
// safe while a stream is being captured).
#include <mutex>

#include "cuda_utils.cuh"

namespace jpa {
namespace cuda {

cudaError_t current_device_info(DeviceInfo* info, int* device) {
  constexpr int kMaxDevices = 64;
  static std::mutex mu;
  static DeviceInfo cache[kMaxDevices];
  static bool filled[kMaxDevices] = {};
  int dev = 0;
  JPA_CUDA_TRY(cudaGetDevice(&dev));
  if (device != nullptr) *device = dev;
  if (dev < 0 || dev >= kMaxDevices) return cudaErrorInvalidDevice;
  std::lock_guard<std::mutex> lock(mu);
  if (!filled[dev]) {
    DeviceInfo d;
    JPA_CUDA_TRY(cudaDeviceGetAttribute(&d.num_sms, cudaDevAttrMultiProcessorCount, dev));
    JPA_CUDA_TRY(
        cudaDeviceGetAttribute(&d.max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    JPA_CUDA_TRY(cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, dev));
    JPA_CUDA_TRY(cudaDeviceGetAttribute(&d.cc_minor, cudaDevAttrComputeCapabilityMinor, dev));
    cache[dev] = d;
    filled[dev] = true;
  }
  *info = cache[dev];
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace jpa
