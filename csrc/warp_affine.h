// Batched bilinear affine warp of uint8 HWC images (cv2.warpAffine with INTER_LINEAR and
// BORDER_CONSTANT, but in float32 instead of OpenCV's fixed point).
//
// Exact definition, shared by the CPU op, the CUDA kernel and the NumPy reference
// (vigface.data.align.warp_affine_ref), which therefore agree bit for bit:
//   1. The forward matrix M (src -> dst, float32) is inverted in double (invert_affine below)
//      and the inverse rounded to float32.
//   2. For output pixel (x, y): sx = (i0 * x + i1 * y) + i2, sy = (i3 * x + i4 * y) + i5 in
//      float32, every product and sum rounded separately (no FMA). Pixel centres sit at integer
//      coordinates.
//   3. sx is clamped to [-1, W] and sy to [-1, H] (a NaN goes to -1). This changes no result (a
//      point beyond that range has all four taps outside) and keeps the integer cast defined.
//   4. x0 = floor(sx), fx = sx - x0 (same for y). The four taps (x0|x0+1, y0|y0+1) read the image,
//      or the border value of the channel for a tap outside it (as cv2's BORDER_CONSTANT).
//   5. top = v00 + fx * (v01 - v00), bot = v10 + fx * (v11 - v10), v = top + fy * (bot - top)
//      (lerp form: a constant region and fx = fy = 0 reproduce the input exactly).
//   6. out = clamp(floor(v + 0.5), 0, 255): round half up.
// (floor is computed without floorf, see warp_pixel; the values are the same.)
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define VIGFACE_HD __host__ __device__ __forceinline__
#else
#define VIGFACE_HD inline
#endif

namespace vigface {

// Step 1. Returns false when M is singular or its inverse does not fit float32.
VIGFACE_HD bool invert_affine(const float* m, float* inv) {
  const double a = m[0], b = m[1], c = m[2], d = m[3], e = m[4], f = m[5];
  const double det = a * e - b * d;
  const double r[6] = {e / det, -b / det, (b * f - e * c) / det, -d / det, a / det, (d * c - a * f) / det};
  for (int i = 0; i < 6; ++i) {
    inv[i] = static_cast<float>(r[i]);
    // det == 0 gives inf/NaN, tiny det overflows float; the test is false for NaN as well.
    if (!(fabsf(inv[i]) <= 3.402823466e38f)) return false;
  }
  return true;
}

// Steps 2-6 for output pixel (x, y) of one image; C channels, border holds C values.
template <int C>
VIGFACE_HD void warp_pixel(const uint8_t* src, int h, int w, const float* inv, int x, int y,
                           const float* border, uint8_t* out) {
  const float xf = static_cast<float>(x), yf = static_cast<float>(y);
  float sx = inv[0] * xf + inv[1] * yf + inv[2];
  float sy = inv[3] * xf + inv[4] * yf + inv[5];
  sx = sx >= -1.0f ? sx : -1.0f;
  sx = sx <= static_cast<float>(w) ? sx : static_cast<float>(w);
  sy = sy >= -1.0f ? sy : -1.0f;
  sy = sy <= static_cast<float>(h) ? sy : static_cast<float>(h);
  // floor() by truncation and a fix-up for negatives: floorf is a libm call on baseline x86-64
  // (no SSE4.1 roundss), which made up most of the CPU op's time.
  int x0 = static_cast<int>(sx), y0 = static_cast<int>(sy);
  x0 -= static_cast<float>(x0) > sx;
  y0 -= static_cast<float>(y0) > sy;
  const float fx = sx - static_cast<float>(x0), fy = sy - static_cast<float>(y0);
  const bool in_x0 = x0 >= 0 && x0 < w, in_x1 = x0 + 1 >= 0 && x0 + 1 < w;
  const bool in_y0 = y0 >= 0 && y0 < h, in_y1 = y0 + 1 >= 0 && y0 + 1 < h;
  // Offsets (not pointers) of the taps: they may point outside the image and are then unused.
  const int64_t o00 = (static_cast<int64_t>(y0) * w + x0) * C;
  const int64_t o01 = o00 + C, o10 = o00 + static_cast<int64_t>(w) * C, o11 = o10 + C;
  for (int ch = 0; ch < C; ++ch) {
    const float v00 = in_y0 && in_x0 ? static_cast<float>(src[o00 + ch]) : border[ch];
    const float v01 = in_y0 && in_x1 ? static_cast<float>(src[o01 + ch]) : border[ch];
    const float v10 = in_y1 && in_x0 ? static_cast<float>(src[o10 + ch]) : border[ch];
    const float v11 = in_y1 && in_x1 ? static_cast<float>(src[o11 + ch]) : border[ch];
    const float top = v00 + fx * (v01 - v00);
    const float bot = v10 + fx * (v11 - v10);
    float v = top + fy * (bot - top) + 0.5f;
    v = v >= 0.0f ? v : 0.0f;  // after this, truncation == floor
    const int q = static_cast<int>(v);
    out[ch] = static_cast<uint8_t>(q <= 255 ? q : 255);
  }
}

// CPU op. src: N x H x W x C, dst: N x out_h x out_w x C (uint8, contiguous), matrices: N x 2 x 3
// forward float32, border: C values in [0, 255]. C must be 1, 3 or 4. Splits the N * out_h output
// rows over num_threads std::threads (0 = hardware_concurrency). Throws std::invalid_argument
// naming the first sample whose matrix is not invertible (before writing anything).
void warp_affine_cpu(const uint8_t* src, uint8_t* dst, const float* matrices, int64_t n, int h, int w,
                     int c, int out_h, int out_w, const float* border, int num_threads);

// CUDA op on device pointers, enqueued on `stream` (a cudaStream_t; nullptr = legacy default
// stream). Same layout and result as warp_affine_cpu; border is a host array of C values. A
// sample with a non-invertible matrix is filled with the border value (the matrices live on the
// device, so checking them here would need a sync). Throws std::runtime_error with the CUDA error
// string when a pointer is not device memory or a CUDA call or the launch fails.
void warp_affine_cuda(const uint8_t* src, uint8_t* dst, const float* matrices, int64_t n, int h, int w,
                      int c, int out_h, int out_w, const float* border, void* stream);

}  // namespace vigface
