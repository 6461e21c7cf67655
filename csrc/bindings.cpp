// The one pybind11 binding file of vigface._C.
//
// No torch here: CPU ops take numpy arrays, CUDA ops take device pointers, shapes and a
// cudaStream_t as plain integers (torch's tensor.data_ptr() and stream.cuda_stream). Argument
// errors raise ValueError (std::invalid_argument); CUDA failures raise RuntimeError. The Python
// wrappers with full validation and the NumPy references live in vigface/data/align.py.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "build_info.h"
#include "device.h"
#include "guided_update.h"
#include "similarity.h"
#include "warp_affine.h"

namespace py = pybind11;

namespace {

#ifdef VIGFACE_WITH_CUDA
constexpr bool kHasCuda = true;
#else
constexpr bool kHasCuda = false;
#endif

using DoubleArray = py::array_t<double, py::array::c_style | py::array::forcecast>;
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using ByteArray = py::array_t<uint8_t, py::array::c_style>;

// Border values as floats, one per channel; a single value is used for every channel.
std::vector<float> border_values(const std::vector<int>& border, int c) {
  if (border.size() != 1 && border.size() != static_cast<size_t>(c))
    throw std::invalid_argument("border must have 1 or " + std::to_string(c) + " values, got " +
                                std::to_string(border.size()));
  std::vector<float> out(static_cast<size_t>(c));
  for (int ch = 0; ch < c; ++ch) {
    const int v = border.size() == 1 ? border[0] : border[static_cast<size_t>(ch)];
    if (v < 0 || v > 255) throw std::invalid_argument("border values must be in [0, 255], got " + std::to_string(v));
    out[static_cast<size_t>(ch)] = static_cast<float>(v);
  }
  return out;
}

py::tuple estimate_similarity(const DoubleArray& landmarks, const DoubleArray& tmpl) {
  if (landmarks.ndim() != 3 || landmarks.shape(2) != 2)
    throw std::invalid_argument("landmarks must have shape (N, K, 2)");
  if (tmpl.ndim() != 2 || tmpl.shape(1) != 2 || tmpl.shape(0) != landmarks.shape(1))
    throw std::invalid_argument("template must have shape (K, 2) with the K of landmarks");
  const int64_t n = landmarks.shape(0), k = landmarks.shape(1);
  py::array_t<float> matrices({n, int64_t{2}, int64_t{3}});
  py::array_t<int32_t> status(n);
  const double* src = landmarks.data();
  const double* dst = tmpl.data();
  float* out = matrices.mutable_data();
  int32_t* st = status.mutable_data();
  {
    py::gil_scoped_release release;
    vigface::estimate_similarity(src, dst, n, k, out, st);
  }
  return py::make_tuple(matrices, status);
}

py::array_t<uint8_t> warp_affine(const ByteArray& images, const FloatArray& matrices, int out_h, int out_w,
                                 const std::vector<int>& border, int num_threads) {
  if (images.ndim() != 4) throw std::invalid_argument("images must have shape (N, H, W, C)");
  const int64_t n = images.shape(0);
  if (matrices.ndim() != 3 || matrices.shape(0) != n || matrices.shape(1) != 2 || matrices.shape(2) != 3)
    throw std::invalid_argument("matrices must have shape (N, 2, 3) with the N of images");
  if (num_threads < 0) throw std::invalid_argument("num_threads must be >= 0 (0 = all cores)");
  const int h = static_cast<int>(images.shape(1)), w = static_cast<int>(images.shape(2));
  const int c = static_cast<int>(images.shape(3));
  const std::vector<float> b = border_values(border, c);
  py::array_t<uint8_t> out({n, static_cast<int64_t>(out_h), static_cast<int64_t>(out_w), static_cast<int64_t>(c)});
  const uint8_t* src = images.data();
  const float* mats = matrices.data();
  uint8_t* dst = out.mutable_data();
  {
    py::gil_scoped_release release;  // the threads below never touch Python objects
    vigface::warp_affine_cpu(src, dst, mats, n, h, w, c, out_h, out_w, b.data(), num_threads);
  }
  return out;
}

void warp_affine_cuda(uintptr_t src_ptr, uintptr_t dst_ptr, uintptr_t matrices_ptr, int64_t n, int h, int w, int c,
                      int out_h, int out_w, const std::vector<int>& border, uintptr_t stream) {
#ifdef VIGFACE_WITH_CUDA
  const std::vector<float> b = border_values(border, c);
  py::gil_scoped_release release;
  vigface::warp_affine_cuda(reinterpret_cast<const uint8_t*>(src_ptr), reinterpret_cast<uint8_t*>(dst_ptr),
                            reinterpret_cast<const float*>(matrices_ptr), n, h, w, c, out_h, out_w, b.data(),
                            reinterpret_cast<void*>(stream));
#else
  (void)src_ptr, (void)dst_ptr, (void)matrices_ptr, (void)n, (void)h, (void)w, (void)c, (void)out_h, (void)out_w;
  (void)border, (void)stream;
  throw std::runtime_error("vigface._C was built without CUDA (no nvcc at build time, or VIGFACE_CUDA=OFF)");
#endif
}

void guided_update_cuda(uintptr_t model_ptr, int model_dtype, uintptr_t w_ptr, uintptr_t x_ptr, uintptr_t prev_ptr,
                        int64_t n, int64_t per_sample, float k_x, float k_m, float c_x, float c_0, float c_p,
                        float lo, float hi, uintptr_t stream) {
#ifdef VIGFACE_WITH_CUDA
  const vigface::GuidedUpdateCoeffs coeffs{k_x, k_m, c_x, c_0, c_p, lo, hi};
  py::gil_scoped_release release;
  vigface::guided_update_cuda(reinterpret_cast<const void*>(model_ptr), model_dtype,
                              reinterpret_cast<const float*>(w_ptr), reinterpret_cast<float*>(x_ptr),
                              reinterpret_cast<float*>(prev_ptr), n, per_sample, coeffs, reinterpret_cast<void*>(stream));
#else
  (void)model_ptr, (void)model_dtype, (void)w_ptr, (void)x_ptr, (void)prev_ptr, (void)n, (void)per_sample;
  (void)k_x, (void)k_m, (void)c_x, (void)c_0, (void)c_p, (void)lo, (void)hi, (void)stream;
  throw std::runtime_error("vigface._C was built without CUDA (no nvcc at build time, or VIGFACE_CUDA=OFF)");
#endif
}

int cuda_device_count() {
#ifdef VIGFACE_WITH_CUDA
  return vigface::cuda_device_count();
#else
  return 0;
#endif
}

py::dict build_info() {
  py::dict info;
  info["cxx_compiler"] = VIGFACE_BUILD_CXX_COMPILER;
  info["build_type"] = VIGFACE_BUILD_TYPE;
  info["cmake_version"] = VIGFACE_BUILD_CMAKE_VERSION;
  info["pybind11_version"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." + std::to_string(PYBIND11_VERSION_MINOR) +
                             "." + std::to_string(PYBIND11_VERSION_PATCH);
  info["cuda_option"] = VIGFACE_BUILD_CUDA_OPTION;  // VIGFACE_CUDA at build time: AUTO, ON or OFF
  info["cuda"] = kHasCuda;
  info["cuda_compiler"] = VIGFACE_BUILD_CUDA_COMPILER;  // "" without CUDA
  info["cuda_archs"] = VIGFACE_BUILD_CUDA_ARCHS;        // e.g. "80;90"
#ifdef VIGFACE_WITH_CUDA
  const int v = vigface::cuda_runtime_version();  // e.g. 13000
  info["cuda_runtime"] = std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
  info["cuda_runtime_library"] = "static";  // linked in: no libcudart needed at run time
#else
  info["cuda_runtime"] = "";
  info["cuda_runtime_library"] = "";
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "vigface C++/CUDA ops (no torch ABI: numpy buffers on CPU, raw pointers + stream on CUDA)";

  m.attr("has_cuda") = kHasCuda;
  m.attr("build_info") = build_info();
  m.attr("SIMILARITY_OK") = static_cast<int>(vigface::kSimilarityOk);
  m.attr("SIMILARITY_NONFINITE") = static_cast<int>(vigface::kSimilarityNonFinite);
  m.attr("SIMILARITY_DEGENERATE") = static_cast<int>(vigface::kSimilarityDegenerate);
  m.attr("DEGENERATE_REL_TOL") = vigface::kDegenerateRelTol;

  m.def("cuda_device_count", &cuda_device_count,
        "Number of CUDA devices visible to the CUDA runtime; 0 without CUDA, driver or GPU (never raises).");
#ifdef VIGFACE_WITH_CUDA
  m.def("cuda_driver_version", &vigface::cuda_driver_version,
        "CUDA API version of the installed driver (e.g. 13000); 0 when there is no driver.");
#else
  m.def("cuda_driver_version", [] { return 0; }, "Always 0: vigface._C was built without CUDA.");
#endif

  m.def("estimate_similarity", &estimate_similarity, py::arg("landmarks"), py::arg("template"),
        "Umeyama similarity per sample: landmarks (N, K, 2), template (K, 2) -> (matrices (N, 2, 3) float32, "
        "status (N,) int32). status: SIMILARITY_OK, SIMILARITY_NONFINITE or SIMILARITY_DEGENERATE (matrix NaN).");
  m.def("warp_affine", &warp_affine, py::arg("images"), py::arg("matrices"), py::arg("out_h"), py::arg("out_w"),
        py::arg("border"), py::arg("num_threads") = 0,
        "Bilinear warp of uint8 (N, H, W, C) images with forward (N, 2, 3) matrices -> (N, out_h, out_w, C). "
        "border: 1 or C values. num_threads: 0 = all cores. Runs without the GIL.");
  m.def("warp_affine_cuda", &warp_affine_cuda, py::arg("src_ptr"), py::arg("dst_ptr"), py::arg("matrices_ptr"),
        py::arg("n"), py::arg("h"), py::arg("w"), py::arg("c"), py::arg("out_h"), py::arg("out_w"), py::arg("border"),
        py::arg("stream"),
        "CUDA warp on device pointers (uint8 src N*H*W*C, uint8 dst N*out_h*out_w*C, float32 matrices N*2*3), "
        "enqueued on the cudaStream_t `stream` (0 = default stream). Asynchronous.");
  m.def("guided_update_cuda", &guided_update_cuda, py::arg("model_ptr"), py::arg("model_dtype"), py::arg("w_ptr"),
        py::arg("x_ptr"), py::arg("prev_ptr"), py::arg("n"), py::arg("per_sample"), py::arg("k_x"), py::arg("k_m"),
        py::arg("c_x"), py::arg("c_0"), py::arg("c_p"), py::arg("lo"), py::arg("hi"), py::arg("stream"),
        "Fused CFG combine + x0 + DDIM/DPM-Solver++ update (csrc/guided_update.h) on device pointers: model "
        "output (2n rows, dtype 0 float32 / 1 bfloat16 / 2 float16), float32 w (n), x and prev (n rows, updated in "
        "place), enqueued on `stream`. Asynchronous; capturable in a CUDA graph.");
}
