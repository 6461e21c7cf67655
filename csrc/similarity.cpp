// Umeyama (1991), "Least-squares estimation of transformation parameters between two point
// patterns", specialised to 2-D.
//
// Umeyama: with centred points s_i (source) and d_i (destination), Sigma = 1/K sum d_i s_i^T =
// U D V^T and var_s = 1/K sum |s_i|^2, the best similarity d ~= c R s + t is
//   R = U S V^T, S = diag(1, det(U) det(V))   (S keeps R a rotation, never a reflection)
//   c = tr(D S) / var_s,  t = mu_d - c R mu_s.
// In 2-D the same R is the rotation maximising tr(R^T Sigma) = 2 (p cos th + q sin th) with
// p = (S11 + S22) / 2, q = (S21 - S12) / 2, so th = atan2(q, p) and tr(D S) = 2 sqrt(p^2 + q^2).
// Hence c R = [[a, -b], [b, a]] with a = 2p / var_s, b = 2q / var_s: no SVD, no branch on the
// rank of Sigma, and collinear (rank-1) point sets need no special case. The NumPy reference
// (vigface.data.align.estimate_similarity_ref) runs the literal SVD form; tests compare them.
#include "similarity.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

namespace vigface {
namespace {

struct Centred {
  double mx, my;  // centroid
  double var;     // mean squared distance to the centroid
  double max_abs;  // largest |coordinate|, the scale for the degeneracy test
};

Centred centre(const double* p, int64_t k) {
  Centred c{0.0, 0.0, 0.0, 0.0};
  for (int64_t i = 0; i < k; ++i) {
    c.mx += p[2 * i];
    c.my += p[2 * i + 1];
    c.max_abs = std::max({c.max_abs, std::fabs(p[2 * i]), std::fabs(p[2 * i + 1])});
  }
  c.mx /= static_cast<double>(k);
  c.my /= static_cast<double>(k);
  for (int64_t i = 0; i < k; ++i) {
    const double dx = p[2 * i] - c.mx, dy = p[2 * i + 1] - c.my;
    c.var += dx * dx + dy * dy;
  }
  c.var /= static_cast<double>(k);
  return c;
}

bool all_finite(const double* p, int64_t count) {
  for (int64_t i = 0; i < count; ++i)
    if (!std::isfinite(p[i])) return false;
  return true;
}

bool degenerate(const Centred& c) {
  const double tol = kDegenerateRelTol * std::max(1.0, c.max_abs);
  return !(std::sqrt(c.var) > tol);
}

}  // namespace

void estimate_similarity(const double* src, const double* dst, int64_t n, int64_t k, float* out,
                         int32_t* status) {
  if (k < 2) throw std::invalid_argument("template needs at least 2 points, got " + std::to_string(k));
  if (!all_finite(dst, 2 * k)) throw std::invalid_argument("template has NaN or infinite coordinates");
  const Centred d = centre(dst, k);
  if (degenerate(d)) throw std::invalid_argument("template points are all (nearly) equal");

  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t s = 0; s < n; ++s) {
    const double* p = src + s * k * 2;
    float* m = out + s * 6;
    if (!all_finite(p, 2 * k)) {
      status[s] = kSimilarityNonFinite;
      std::fill(m, m + 6, nan);
      continue;
    }
    const Centred c = centre(p, k);
    if (degenerate(c)) {
      status[s] = kSimilarityDegenerate;
      std::fill(m, m + 6, nan);
      continue;
    }
    // 2p = tr(Sigma) and 2q = Sigma21 - Sigma12, with Sigma = 1/K sum d_i s_i^T (centred).
    double two_p = 0.0, two_q = 0.0;
    for (int64_t i = 0; i < k; ++i) {
      const double sx = p[2 * i] - c.mx, sy = p[2 * i + 1] - c.my;
      const double dx = dst[2 * i] - d.mx, dy = dst[2 * i + 1] - d.my;
      two_p += dx * sx + dy * sy;
      two_q += dy * sx - dx * sy;
    }
    two_p /= static_cast<double>(k);
    two_q /= static_cast<double>(k);
    const double a = two_p / c.var, b = two_q / c.var;  // c R = [[a, -b], [b, a]]
    m[0] = static_cast<float>(a);
    m[1] = static_cast<float>(-b);
    m[2] = static_cast<float>(d.mx - (a * c.mx - b * c.my));
    m[3] = static_cast<float>(b);
    m[4] = static_cast<float>(a);
    m[5] = static_cast<float>(d.my - (b * c.mx + a * c.my));
    status[s] = kSimilarityOk;
  }
}

}  // namespace vigface
