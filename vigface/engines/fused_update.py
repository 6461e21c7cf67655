"""One sampler step after the denoiser: guidance (eq. 9), the x0 estimate and the sampler update, fused.

Every sampler offered here (deterministic DDIM, DPM-Solver++(2M) at time- or logSNR-spaced
timesteps) is linear in the current state
x, the guided x0 estimate and the previous step's x0, with coefficients that depend only on the
step index. So one step is, per element (exact definition shared with csrc/guided_update.h):

    1. g    = w m_cond + (1 - w) m_uncond             VIGFace eq. 9, on the [cond; uncond] model output
    2. x0   = clamp(k_x x + k_m g, -1, 1)             x0 prediction: (k_x, k_m) = (0, 1);
                                                      v prediction:  (sqrt(a_t), -sqrt(1 - a_t))
    3. x   <- c_x x + c_0 x0 + c_p prev               the sampler update
    4. prev <- x0

`plan_steps` computes (t, k_x, k_m, c_x, c_0, c_p) for every step on the host, once, in float64.
With a_t = alpha_bar at the step's timestep and a_n at the next one (1 after the last step):

    DDIM (eta = 0, Song et al. eq. 12):
        c_x = sqrt(1 - a_n) / sqrt(1 - a_t),  c_0 = sqrt(a_n) - c_x sqrt(a_t),  c_p = 0
    DPM-Solver++(2M) (Lu et al. Alg. 2): h = lambda_n - lambda_t, lambda = log(sqrt(a) / sqrt(1 - a)),
        first order (first and last step) is exactly DDIM;  second order with r = h_prev / h:
        c_x = sqrt(1 - a_n) / sqrt(1 - a_t),  c_0 = -sqrt(a_n) expm1(-h) (1 + 1 / (2 r)),
        c_p = sqrt(a_n) expm1(-h) / (2 r)
    The last step goes to a_n = 1, where both reduce to x = x0 (c_x = 0, c_0 = 1).

`guided_update_ref` is the plain-PyTorch reference (and the CPU path); `guided_update_` runs, in
place, one of: impl "cuda", the CUDA op of vigface._C (one kernel, no host sync); impl "triton",
its Triton twin (kernels/guided_update.py); impl "torch", the reference. impl "auto" is the CUDA
op for CUDA tensors when it is built, else the reference; the environment variable
VIGFACE_GUIDED_UPDATE=cuda|triton|torch overrides what "auto" picks (to compare them in one run).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from vigface.choices import SAMPLER_SPACING, SAMPLERS
from vigface.diffusion.dpm_solver import dpm_timesteps
from vigface.diffusion.schedule import NoiseSchedule
from vigface.errors import BackendUnavailableError, VigfaceError

IMPLS = ("auto", "torch", "cuda", "triton")
CLAMP = (-1.0, 1.0)  # the x0 estimate of a face image in [-1, 1]
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # csrc/guided_update.h


@dataclass(frozen=True)
class StepCoefficients:
    t: int  # the timestep the denoiser sees
    k_x: float
    k_m: float
    c_x: float
    c_0: float
    c_p: float


def plan_steps(schedule: NoiseSchedule, sampler: str, steps: int, prediction: str = "x0") -> list:
    """The coefficients of every step of `sampler` with `steps` model calls (see the module doc)."""
    if sampler not in SAMPLERS:
        raise VigfaceError(f"sampler {sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}")
    if prediction not in ("x0", "v"):
        raise VigfaceError(f"prediction {prediction!r} is unknown; choose x0 or v")
    alphas = schedule.alphas_cumprod.tolist()
    timesteps = dpm_timesteps(schedule, steps, SAMPLER_SPACING[sampler]).tolist()

    def lam(a: float) -> float:
        return 0.5 * math.log(a / (1 - a))

    plan, h_previous = [], None
    for i, t in enumerate(timesteps):
        a_t = alphas[t]
        k_x, k_m = (0.0, 1.0) if prediction == "x0" else (math.sqrt(a_t), -math.sqrt(1 - a_t))
        last = i + 1 == len(timesteps)
        if last:  # to a = 1: the clean-image estimate itself
            plan.append(StepCoefficients(t, k_x, k_m, 0.0, 1.0, 0.0))
            break
        a_n = alphas[timesteps[i + 1]]
        c_x = math.sqrt(1 - a_n) / math.sqrt(1 - a_t)
        h = lam(a_n) - lam(a_t)
        if sampler == "ddim" or h_previous is None:  # first order: DDIM
            c_0, c_p = math.sqrt(a_n) - c_x * math.sqrt(a_t), 0.0
        else:
            r = h_previous / h
            c_0 = -math.sqrt(a_n) * math.expm1(-h) * (1 + 1 / (2 * r))
            c_p = math.sqrt(a_n) * math.expm1(-h) / (2 * r)
        plan.append(StepCoefficients(t, k_x, k_m, c_x, c_0, c_p))
        h_previous = h
    return plan


def guided_update_ref(
    model_out: torch.Tensor, x: torch.Tensor, prev: torch.Tensor, w: torch.Tensor, step: StepCoefficients
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-4 in float32: model_out (2N, ...) [cond; uncond], x, prev (N, ...), w (N,) -> (x_new, x0)."""
    n = x.shape[0]
    m = model_out.float()
    wv = w.float().view(-1, *([1] * (x.dim() - 1)))
    g = wv * m[:n] + (1 - wv) * m[n:]  # 1. eq. 9
    x0 = (step.k_x * x + step.k_m * g).clamp(*CLAMP)  # 2.
    x_new = step.c_x * x + step.c_0 * x0 + step.c_p * prev  # 3.
    return x_new, x0  # 4. is the caller's: prev = x0


def cuda_op_available() -> bool:
    try:
        from vigface import _C
    except ImportError:
        return False
    return bool(_C.has_cuda) and _C.cuda_device_count() > 0


def auto_impl(x: torch.Tensor) -> str:
    """What impl "auto" runs for state x: VIGFACE_GUIDED_UPDATE if set, else cuda (when built) or torch."""
    chosen = os.environ.get("VIGFACE_GUIDED_UPDATE", "")
    if chosen:
        if chosen not in IMPLS[1:]:
            raise VigfaceError(f"VIGFACE_GUIDED_UPDATE={chosen!r}: choose one of {', '.join(IMPLS[1:])}")
        return chosen
    return "cuda" if x.is_cuda and cuda_op_available() else "torch"


def _check(model_out: torch.Tensor, x: torch.Tensor, prev: torch.Tensor, w: torch.Tensor) -> None:
    n = x.shape[0]
    if model_out.shape != (2 * n, *x.shape[1:]):
        raise VigfaceError(
            f"guided_update: model_out must have shape {(2 * n, *x.shape[1:])} ([cond; uncond] rows), "
            f"got {tuple(model_out.shape)}"
        )
    if prev.shape != x.shape or w.shape != (n,):
        raise VigfaceError(
            f"guided_update: prev must have x's shape {tuple(x.shape)} and w shape ({n},), "
            f"got {tuple(prev.shape)} and {tuple(w.shape)}"
        )


def guided_update_(
    model_out: torch.Tensor,
    x: torch.Tensor,
    prev: torch.Tensor,
    w: torch.Tensor,
    step: StepCoefficients,
    impl: str = "auto",
) -> None:
    """In place: x <- the updated state, prev <- x0. impl "auto" = "cuda" for CUDA tensors when built."""
    if impl not in IMPLS:
        raise VigfaceError(f"guided_update impl {impl!r} is unknown; choose one of {', '.join(IMPLS)}")
    _check(model_out, x, prev, w)
    if impl == "auto":
        impl = auto_impl(x)
    if impl == "triton":
        from vigface.kernels.guided_update import guided_update_triton_

        guided_update_triton_(model_out, x, prev, w, step, CLAMP)
        return
    if impl == "torch":
        x_new, x0 = guided_update_ref(model_out, x, prev, w, step)
        x.copy_(x_new)
        prev.copy_(x0)
        return
    _guided_update_cuda(model_out, x, prev, w, step)


def _guided_update_cuda(model_out, x, prev, w, step: StepCoefficients) -> None:
    if not cuda_op_available():
        raise BackendUnavailableError(
            "guided_update impl 'cuda' needs vigface._C built with CUDA and a visible GPU; use impl='torch'"
        )
    for name, tensor in (("model_out", model_out), ("x", x), ("prev", prev), ("w", w)):
        if not tensor.is_cuda or not tensor.is_contiguous() or tensor.device != x.device:
            raise VigfaceError(f"guided_update impl 'cuda': {name} must be a contiguous tensor on {x.device}")
    if x.dtype != torch.float32 or prev.dtype != torch.float32 or w.dtype != torch.float32:
        raise VigfaceError("guided_update impl 'cuda': x, prev and w must be float32")
    if model_out.dtype not in _DTYPE_CODES:
        raise VigfaceError(f"guided_update impl 'cuda': model_out dtype {model_out.dtype} is not supported")
    from vigface import _C

    n = x.shape[0]
    _C.guided_update_cuda(
        model_out.data_ptr(), _DTYPE_CODES[model_out.dtype], w.data_ptr(), x.data_ptr(), prev.data_ptr(),
        n, x[0].numel() if n else 0, step.k_x, step.k_m, step.c_x, step.c_0, step.c_p, CLAMP[0], CLAMP[1],
        torch.cuda.current_stream(x.device).cuda_stream,
    )  # fmt: skip
