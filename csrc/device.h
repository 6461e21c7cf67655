// CUDA runtime queries that must never throw, so `import vigface._C` and availability checks work
// on machines without a driver or GPU. Implemented in device.cu (built only with CUDA); without
// CUDA the bindings report 0 devices.
#pragma once

namespace vigface {

// Number of CUDA devices the runtime sees; 0 when there is no driver, no GPU, or any error.
int cuda_device_count() noexcept;

// CUDA runtime version compiled in (e.g. 13000 for 13.0).
int cuda_runtime_version() noexcept;

// Version of the installed driver's CUDA API (e.g. 13000); 0 when no driver is installed.
int cuda_driver_version() noexcept;

}  // namespace vigface
