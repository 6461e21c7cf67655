// The fused guidance + sampler-update kernel (definition in guided_update.h): a memory-bound
// elementwise pass. Per element it reads 2 model values + x + prev and writes x + prev, 24 bytes
// in float32, so at ViT-B/4 112x112 (37,632 values per image) one step of a 64-image batch moves
// ~58 MB: ~20 us on an H100 at 3 TB/s, against ~4 separate torch ops (~5x the traffic) unfused.
#include "guided_update.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <stdexcept>
#include <string>

namespace vigface {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535 * 8;  // grid-stride beyond this: plenty to fill any GPU

__device__ __forceinline__ float load_value(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load_value(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ float load_value(const __half* p, int64_t i) { return __half2float(p[i]); }

template <typename T>
__global__ void guided_update_kernel(const T* model_out, const float* w, float* x, float* prev, int64_t n,
                                     int64_t per_sample, GuidedUpdateCoeffs c) {
  const int64_t total = n * per_sample;
  const int64_t uncond_offset = total;  // the unconditional rows follow the conditional ones
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float wi = w[idx / per_sample];
    const float m_cond = load_value(model_out, idx);
    const float m_uncond = load_value(model_out, idx + uncond_offset);
    const float g = wi * m_cond + (1.0f - wi) * m_uncond;  // 1. eq. 9
    float x0 = c.k_x * x[idx] + c.k_m * g;                  // 2.
    x0 = fminf(fmaxf(x0, c.lo), c.hi);
    const float x_new = c.c_x * x[idx] + c.c_0 * x0 + c.c_p * prev[idx];  // 3.
    x[idx] = x_new;
    prev[idx] = x0;  // 4.
  }
}

}  // namespace

void guided_update_cuda(const void* model_out, int model_dtype, const float* w, float* x, float* prev, int64_t n,
                        int64_t per_sample, GuidedUpdateCoeffs coeffs, void* stream) {
  if (n < 0 || per_sample < 0)
    throw std::invalid_argument("guided_update_cuda: n and per_sample must be >= 0, got " + std::to_string(n) +
                                " and " + std::to_string(per_sample));
  if (model_dtype != kGuidedFloat32 && model_dtype != kGuidedBFloat16 && model_dtype != kGuidedFloat16)
    throw std::invalid_argument("guided_update_cuda: model_dtype must be 0 (float32), 1 (bfloat16) or 2 (float16), got " +
                                std::to_string(model_dtype));
  const int64_t total = n * per_sample;
  if (total == 0) return;
  const unsigned blocks = static_cast<unsigned>(std::min((total + kThreads - 1) / kThreads, kMaxBlocks));
  cudaGetLastError();  // an error left pending by earlier, unrelated work is not ours to report
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (model_dtype) {
    case kGuidedFloat32:
      guided_update_kernel<<<blocks, kThreads, 0, s>>>(static_cast<const float*>(model_out), w, x, prev, n,
                                                       per_sample, coeffs);
      break;
    case kGuidedBFloat16:
      guided_update_kernel<<<blocks, kThreads, 0, s>>>(static_cast<const __nv_bfloat16*>(model_out), w, x, prev, n,
                                                       per_sample, coeffs);
      break;
    default:
      guided_update_kernel<<<blocks, kThreads, 0, s>>>(static_cast<const __half*>(model_out), w, x, prev, n,
                                                       per_sample, coeffs);
      break;
  }
  const cudaError_t err = cudaGetLastError();  // the launch status (no sync: graph capture safe)
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("vigface guided_update_cuda: kernel launch failed: ") +
                             cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

}  // namespace vigface
