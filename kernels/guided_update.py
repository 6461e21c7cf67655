"""One sampler step after the denoiser as a Triton kernel: CFG combine, x0 estimate, sampler update.

The same per-element definition as `vigface.engines.fused_update` (its module doc) and the CUDA op
in csrc/guided_update.cu, whose plain-PyTorch reference is `fused_update.guided_update_ref`:

    g = w m_cond + (1 - w) m_uncond;   x0 = clamp(k_x x + k_m g, lo, hi)
    x <- c_x x + c_0 x0 + c_p prev;      prev <- x0

Why a Triton twin of the CUDA op: Triton launches on torch's current stream through the driver
API, so it is captured into a CUDA graph exactly like torch's own kernels, with no second CUDA
runtime involved (vigface._C links its runtime statically).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from vigface.errors import BackendUnavailableError, VigfaceError

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK = 1024


@triton.jit
def _guided_update_kernel(
    model_out, w, x, prev, total, per_sample, k_x, k_m, c_x, c_0, c_p, lo, hi, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    wi = tl.load(w + offs // per_sample, mask=mask, other=0.0)
    m_cond = tl.load(model_out + offs, mask=mask, other=0.0).to(tl.float32)
    # the unconditional rows follow the conditional ones
    m_uncond = tl.load(model_out + total + offs, mask=mask, other=0.0).to(tl.float32)
    g = wi * m_cond + (1.0 - wi) * m_uncond
    xv = tl.load(x + offs, mask=mask, other=0.0)
    x0 = tl.minimum(tl.maximum(k_x * xv + k_m * g, lo), hi)
    pv = tl.load(prev + offs, mask=mask, other=0.0)
    tl.store(x + offs, c_x * xv + c_0 * x0 + c_p * pv, mask=mask)
    tl.store(prev + offs, x0, mask=mask)


def guided_update_triton_(model_out, x, prev, w, step, clamp=(-1.0, 1.0)) -> None:
    """In place on contiguous tensors: x <- the updated state, prev <- x0 (shapes checked by the caller)."""
    for name, t in (("model_out", model_out), ("x", x), ("prev", prev), ("w", w)):
        if not t.is_contiguous() or t.device != x.device:
            raise VigfaceError(f"guided_update impl 'triton': {name} must be contiguous and on {x.device}")
    if x.dtype != torch.float32 or prev.dtype != torch.float32 or w.dtype != torch.float32:
        raise VigfaceError("guided_update impl 'triton': x, prev and w must be float32")
    if x.device.type != "cuda" and not INTERPRET:
        raise BackendUnavailableError(
            "guided_update impl 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 before importing "
            "vigface.kernels, for the slow interpreter); use impl='torch'"
        )
    total = x.numel()
    if total == 0:
        return
    _guided_update_kernel[(triton.cdiv(total, BLOCK),)](
        model_out, w, x, prev, total, total // x.shape[0], float(step.k_x), float(step.k_m), float(step.c_x),
        float(step.c_0), float(step.c_p), float(clamp[0]), float(clamp[1]), BLOCK=BLOCK,
    )  # fmt: skip
