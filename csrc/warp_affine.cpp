// CPU bilinear affine warp: the per-pixel rule lives in warp_affine.h (shared with CUDA); this
// file inverts the matrices and spreads the output rows over std::threads.
#include "warp_affine.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

namespace vigface {
namespace {

// Every thread gets at least this many output pixels: ~one 112x112 face. Starting a thread costs
// tens of microseconds, about what warping one face costs, so a single face stays on one thread
// (the toy-data workers call this per image from many processes).
constexpr int64_t kMinPixelsPerThread = 16384;

template <int C>
void warp_rows(const uint8_t* src, uint8_t* dst, const float* inv, int h, int w, int out_h, int out_w,
               const float* border, int64_t row_begin, int64_t row_end) {
  const int64_t src_stride = static_cast<int64_t>(h) * w * C;
  // Local copies: stores through uint8_t* may alias any object, so without them the compiler
  // reloads the matrix and border from memory after every output byte.
  float b[C];
  for (int ch = 0; ch < C; ++ch) b[ch] = border[ch];
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t i = row / out_h;  // sample
    const int y = static_cast<int>(row % out_h);
    float m[6];
    for (int j = 0; j < 6; ++j) m[j] = inv[i * 6 + j];
    const uint8_t* image = src + i * src_stride;
    uint8_t* out = dst + row * out_w * C;
    for (int x = 0; x < out_w; ++x) warp_pixel<C>(image, h, w, m, x, y, b, out + x * C);
  }
}

}  // namespace

void warp_affine_cpu(const uint8_t* src, uint8_t* dst, const float* matrices, int64_t n, int h, int w,
                     int c, int out_h, int out_w, const float* border, int num_threads) {
  if (c != 1 && c != 3 && c != 4)
    throw std::invalid_argument("warp_affine: channels must be 1, 3 or 4, got " + std::to_string(c));
  if (h <= 0 || w <= 0 || out_h <= 0 || out_w <= 0) throw std::invalid_argument("warp_affine: empty image size");
  if (n <= 0) return;

  // Invert every matrix before touching the output, so a bad one fails cleanly.
  std::vector<float> inv(static_cast<size_t>(n) * 6);
  for (int64_t i = 0; i < n; ++i) {
    if (!invert_affine(matrices + i * 6, inv.data() + i * 6))
      throw std::invalid_argument("warp_affine: matrices[" + std::to_string(i) +
                                  "] is not invertible (singular, or its inverse overflows float32)");
  }

  auto run = [&](int64_t begin, int64_t end) {
    switch (c) {
      case 1: warp_rows<1>(src, dst, inv.data(), h, w, out_h, out_w, border, begin, end); break;
      case 3: warp_rows<3>(src, dst, inv.data(), h, w, out_h, out_w, border, begin, end); break;
      default: warp_rows<4>(src, dst, inv.data(), h, w, out_h, out_w, border, begin, end); break;
    }
  };

  const int64_t rows = n * out_h;
  int64_t threads = num_threads > 0 ? num_threads : std::max(1u, std::thread::hardware_concurrency());
  threads = std::min(threads, std::max<int64_t>(1, rows * out_w / kMinPixelsPerThread));
  threads = std::min(threads, rows);
  if (threads <= 1) {
    run(0, rows);
    return;
  }
  // Contiguous row blocks: each thread writes its own part of dst, nothing is shared but reads.
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads - 1));
  const int64_t per = rows / threads, extra = rows % threads;
  int64_t begin = 0;
  for (int64_t t = 0; t < threads; ++t) {
    const int64_t end = begin + per + (t < extra ? 1 : 0);
    if (t == threads - 1) {
      run(begin, end);  // the calling thread does the last block
    } else {
      try {
        pool.emplace_back(run, begin, end);
      } catch (const std::system_error&) {
        run(begin, end);  // out of threads: do the block here rather than fail
      }
    }
    begin = end;
  }
  for (auto& th : pool) th.join();
}

}  // namespace vigface
