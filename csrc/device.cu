// CUDA runtime queries (see device.h). The runtime is linked statically and loads the driver
// (libcuda.so) on the first call, so these calls are where "no driver / no GPU" shows up: they
// turn every error into 0 and clear it, so it cannot leak into the next CUDA call's status.
#include "device.h"

#include <cuda_runtime_api.h>

namespace vigface {

int cuda_device_count() noexcept {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // e.g. cudaErrorNoDevice or cudaErrorInsufficientDriver
    return 0;
  }
  return count;
}

int cuda_runtime_version() noexcept { return CUDART_VERSION; }

int cuda_driver_version() noexcept {
  int version = 0;
  if (cudaDriverGetVersion(&version) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return version;  // 0 when no driver is installed
}

}  // namespace vigface
