"""Multi-head self-attention through one function whose backend is chosen, never guessed.

    sdpa    torch's scaled_dot_product_attention (the reference; torch picks its own kernel)
    triton  vigface.kernels.flash_attention: CUDA tensors (or the CPU interpreter under
            TRITON_INTERPRET=1), head_dim 16..256 in powers of 2
    flash   flash-attn-4 (`flash_attn.cute`, CuTe DSL, Hopper/Blackwell, fp16/bf16): `pip install
            flash-attn-4` or the `flash` extra
    auto    triton for 16-bit CUDA tensors it supports, else sdpa; the choice is logged once per kind

A backend that cannot run raises BackendUnavailableError naming what is missing. The Triton and
flash-attn modules are imported on first use, so the core imports without them.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from vigface.diffusion.denoiser_config import ATTENTION
from vigface.errors import BackendUnavailableError

log = logging.getLogger(__name__)
_auto_logged: set[tuple[str, str]] = set()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for (N, heads, tokens, head_dim) tensors."""
    if backend == "auto":
        backend = _auto_backend(q)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "triton":
        return _triton_kernels().flash_attention(q, k, v)
    if backend == "flash":
        return _flash_attn4(q, k, v)
    raise BackendUnavailableError(
        f"attention backend {backend!r} is unknown; choose one of {', '.join(ATTENTION)}"
    )


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The textbook formula, in fp32: the oracle every attention kernel is tested against."""
    scores = q.float() @ k.float().transpose(-1, -2) / q.shape[-1] ** 0.5
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def _auto_backend(q: torch.Tensor) -> str:
    choice = "sdpa"
    if q.is_cuda:
        try:
            kernels = _triton_kernels()
        except BackendUnavailableError:
            kernels = None
        # 16-bit only: the kernel's fp32 path (IEEE dots) is an exactness check, not a fast path
        if (
            kernels is not None
            and q.shape[-1] in kernels.HEAD_DIMS
            and q.dtype in (torch.float16, torch.bfloat16)
        ):
            choice = "triton"
    if (q.device.type, choice) not in _auto_logged:
        _auto_logged.add((q.device.type, choice))
        log.info("attention='auto' chose %s for %s %s tensors (head_dim %d)", choice, q.device.type, q.dtype,
                 q.shape[-1])  # fmt: skip
    return choice


def _triton_kernels():
    try:
        from vigface.kernels import flash_attention
    except ImportError as exc:
        raise BackendUnavailableError(
            f"attention backend 'triton' needs the triton package ({exc})"
        ) from None
    return flash_attention


def _flash_attn4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    try:
        from flash_attn.cute import flash_attn_func
    except ImportError as exc:
        raise BackendUnavailableError(
            f"attention backend 'flash' needs flash-attn-4 (pip install flash-attn-4; import failed: {exc})"
        ) from None
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise BackendUnavailableError(
            f"attention backend 'flash' needs float16/bfloat16 CUDA tensors, got {q.dtype} on {q.device}"
        )
    # flash_attn.cute takes (N, tokens, heads, head_dim); a transposed view, no copy.
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    if isinstance(out, tuple):  # (out, lse) in flash-attn-4 4.0 betas
        out = out[0]
    return out.transpose(1, 2)
