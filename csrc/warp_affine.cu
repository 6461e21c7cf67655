// CUDA bilinear affine warp: one thread per output pixel (all channels), the per-pixel rule from
// warp_affine.h, so the result equals the CPU op bit for bit (this file is compiled with
// --fmad=false; see CMakeLists.txt).
#include "warp_affine.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <stdexcept>
#include <string>

namespace vigface {
namespace {

// 32 x 8 threads: a warp covers 32 consecutive output pixels of one row, so the stores of a
// warp are contiguous and its reads come from a few source rows.
constexpr int kBlockX = 32;
constexpr int kBlockY = 8;
constexpr int64_t kMaxGridZ = 65535;  // CUDA's limit on gridDim.z; larger batches loop in-kernel

void check(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  cudaGetLastError();  // clear a non-sticky error so it is not reported again by the next call
  throw std::runtime_error(std::string("vigface warp_affine_cuda: ") + what + " failed: " + cudaGetErrorName(err) +
                           " (" + cudaGetErrorString(err) + ")");
}

// A host pointer (e.g. a numpy buffer passed by mistake) would fault inside the kernel and
// poison the CUDA context; catch it here with a readable message instead.
void check_device_pointer(const void* ptr, const char* name, int device) {
  cudaPointerAttributes attr{};
  check(cudaPointerGetAttributes(&attr, ptr), "cudaPointerGetAttributes");
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    throw std::runtime_error(std::string("vigface warp_affine_cuda: ") + name +
                             " is not CUDA device memory (a host or unregistered pointer)");
  if (attr.type == cudaMemoryTypeDevice && attr.device != device)
    throw std::runtime_error(std::string("vigface warp_affine_cuda: ") + name + " lives on CUDA device " +
                             std::to_string(attr.device) + " but the current device is " + std::to_string(device));
}

struct Border {
  float v[4];
};

template <int C>
__global__ void warp_affine_kernel(const uint8_t* __restrict__ src, uint8_t* __restrict__ dst,
                                   const float* __restrict__ matrices, int64_t n, int h, int w, int out_h,
                                   int out_w, Border border) {
  __shared__ float inv[6];
  __shared__ bool invertible;
  const int x = blockIdx.x * kBlockX + threadIdx.x;
  const int y = blockIdx.y * kBlockY + threadIdx.y;
  // The loop bound is the same for every thread of the block, so the barriers are safe.
  for (int64_t i = blockIdx.z; i < n; i += gridDim.z) {
    // One double-precision inversion per block and sample, not per pixel.
    if (threadIdx.x == 0 && threadIdx.y == 0) invertible = invert_affine(matrices + i * 6, inv);
    __syncthreads();
    if (x < out_w && y < out_h) {
      uint8_t* out = dst + ((i * out_h + y) * out_w + x) * C;
      if (invertible) {
        warp_pixel<C>(src + i * h * w * C, h, w, inv, x, y, border.v, out);
      } else {
        for (int ch = 0; ch < C; ++ch) out[ch] = static_cast<uint8_t>(border.v[ch]);
      }
    }
    __syncthreads();  // everyone is done with inv before thread 0 overwrites it
  }
}

}  // namespace

void warp_affine_cuda(const uint8_t* src, uint8_t* dst, const float* matrices, int64_t n, int h, int w,
                      int c, int out_h, int out_w, const float* border, void* stream) {
  if (c != 1 && c != 3 && c != 4)
    throw std::invalid_argument("warp_affine_cuda: channels must be 1, 3 or 4, got " + std::to_string(c));
  if (h <= 0 || w <= 0 || out_h <= 0 || out_w <= 0) throw std::invalid_argument("warp_affine_cuda: empty image size");
  if ((out_h + kBlockY - 1) / kBlockY > 65535)
    throw std::invalid_argument("warp_affine_cuda: out_h " + std::to_string(out_h) + " is too large");
  if (n <= 0) return;

  // An error left pending by earlier, unrelated work would otherwise be reported as ours below.
  cudaGetLastError();
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check_device_pointer(src, "src_ptr", device);
  check_device_pointer(dst, "dst_ptr", device);
  check_device_pointer(matrices, "matrices_ptr", device);

  Border b{};
  for (int ch = 0; ch < c; ++ch) b.v[ch] = border[ch];
  const dim3 block(kBlockX, kBlockY);
  const dim3 grid((out_w + kBlockX - 1) / kBlockX, (out_h + kBlockY - 1) / kBlockY,
                  static_cast<unsigned>(std::min(n, kMaxGridZ)));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (c) {
    case 1: warp_affine_kernel<1><<<grid, block, 0, s>>>(src, dst, matrices, n, h, w, out_h, out_w, b); break;
    case 3: warp_affine_kernel<3><<<grid, block, 0, s>>>(src, dst, matrices, n, h, w, out_h, out_w, b); break;
    default: warp_affine_kernel<4><<<grid, block, 0, s>>>(src, dst, matrices, n, h, w, out_h, out_w, b); break;
  }
  check(cudaGetLastError(), "kernel launch");
}

}  // namespace vigface
