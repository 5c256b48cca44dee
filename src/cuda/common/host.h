// Host-side helpers shared by the CUDA entry points: turning a CUDA error into a Status that
// names the call and the place, and raising a kernel's dynamic shared-memory limit once per device.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "monarchrt/status.h"

namespace monarchrt {
namespace cuda_detail {

inline Status cuda_error(cudaError_t e, const char* what, const char* file, int line) {
  return Status::internal(std::string(what) + " failed: " + cudaGetErrorString(e) + " (" + file + ":" +
                          std::to_string(line) + ")");
}

#define MONARCHRT_CUDA_CHECK(call)                                                                 \
  do {                                                                                             \
    cudaError_t e_ = (call);                                                                       \
    if (e_ != cudaSuccess) return ::monarchrt::cuda_detail::cuda_error(e_, #call, __FILE__, __LINE__); \
  } while (0)

// Whether the Hopper (wgmma) kernels may run: the build has sm_90a code and the current device
// is compute capability 9.0. MONARCHRT_NO_WGMMA=1 in the environment (read once) turns them off,
// to compare with the portable kernels on the same card.
inline bool use_wgmma() {
#ifdef MONARCHRT_SM90A
  static const bool disabled = [] {
    const char* e = std::getenv("MONARCHRT_NO_WGMMA");
    return e != nullptr && e[0] != '\0' && e[0] != '0';
  }();
  int device = 0, major = 0, minor = 0;
  if (disabled || cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    return false;
  }
  return major == 9 && minor == 0;
#else
  return false;
#endif
}

// Raises `kernel`'s dynamic shared-memory limit on the current device, once per device (a bit
// per device in `done`). Setting the attribute also loads the kernel's module, which lazy
// loading would otherwise do inside the first launch.
template <typename Kernel>
Status ensure_smem(Kernel kernel, size_t bytes, std::atomic<uint64_t>& done) {
  int device = 0;
  MONARCHRT_CUDA_CHECK(cudaGetDevice(&device));
  const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
  if (bit != 0 && (done.load() & bit) != 0) return Status();
  MONARCHRT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  done.fetch_or(bit);
  return Status();
}

}  // namespace cuda_detail
}  // namespace monarchrt
