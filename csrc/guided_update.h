// One sampler step after the denoiser: classifier-free guidance (VIGFace eq. 9), the x0 estimate,
// and a DDIM / DPM-Solver++(2M) update, fused into one pass over memory.
//
// Exact definition, shared with the PyTorch reference vigface.engines.fused_update.guided_update_ref.
// For sample i < n and element j < per_sample (model_out holds the conditional rows 0..n-1, then
// the unconditional rows n..2n-1, as the batched [cond; uncond] forward produces them):
//   1. g  = w[i] m_cond + (1 - w[i]) m_uncond                    (eq. 9, on the raw model output)
//   2. x0 = clamp(k_x x + k_m g, lo, hi)                         (x0 prediction: k_x = 0, k_m = 1;
//                                                                  v prediction: sqrt(a), -sqrt(1-a))
//   3. x  <- c_x x + c_0 x0 + c_p prev                           (DDIM: c_p = 0; DPM-Solver++(2M):
//                                                                  second-order term in c_p)
//   4. prev <- x0                                                (the history DPM-Solver++ needs)
// All arithmetic in float32; model_out may be float32, bfloat16 or float16. x and prev are
// float32 and updated in place (each element is read and written by the same thread).
#pragma once

#include <cstdint>

namespace vigface {

enum GuidedUpdateDtype : int { kGuidedFloat32 = 0, kGuidedBFloat16 = 1, kGuidedFloat16 = 2 };

struct GuidedUpdateCoeffs {
  float k_x, k_m;       // step 2
  float c_x, c_0, c_p;  // step 3
  float lo, hi;         // the clamp of step 2 (-inf, inf for none)
};

// Enqueued on `stream` (a cudaStream_t; nullptr = legacy default stream). No host sync and no
// allocation, so it can be captured in a CUDA graph. Throws std::invalid_argument for a bad
// dtype code or negative sizes, std::runtime_error when the launch fails.
void guided_update_cuda(const void* model_out, int model_dtype, const float* w, float* x, float* prev, int64_t n,
                        int64_t per_sample, GuidedUpdateCoeffs coeffs, void* stream);

}  // namespace vigface
