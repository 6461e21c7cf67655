// Batched least-squares similarity transforms (Umeyama 1991) from K-point landmarks to a template.
//
// CPU only, in double precision: 5 points per face make this a few hundred flops per sample, so
// a GPU version would cost more in launch and copies than it saves. The matrices (N x 2 x 3
// float32) are uploaded together with the images for the CUDA warp.
#pragma once

#include <cstdint>

namespace vigface {

// Per-sample result of estimate_similarity.
enum SimilarityStatus : int32_t {
  kSimilarityOk = 0,
  kSimilarityNonFinite = 1,   // a landmark coordinate is NaN or +-inf
  kSimilarityDegenerate = 2,  // the points have (almost) no spread: all equal, no scale defined
};

// A point set is degenerate when its RMS distance to the centroid is at most
// kDegenerateRelTol * max(1, largest |coordinate|). 1e-6 is ~16 float32 ulps of the coordinates:
// below that the spread is rounding noise and the fitted scale is meaningless.
constexpr double kDegenerateRelTol = 1e-6;

// src: N x K x 2 landmarks, dst: K x 2 template (both row-major doubles).
// out: N x 2 x 3 float32 matrices M with dst ~= M @ [x, y, 1] (cv2.warpAffine convention).
// status: N codes (SimilarityStatus); a bad sample's matrix is filled with NaN.
// Throws std::invalid_argument when K < 2 or the template itself is non-finite or degenerate.
void estimate_similarity(const double* src, const double* dst, int64_t n, int64_t k, float* out,
                         int32_t* status);

}  // namespace vigface
