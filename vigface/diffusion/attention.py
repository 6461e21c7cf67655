"""Multi-head self-attention through one function whose backend is chosen, never guessed.

backend="sdpa" uses torch's scaled_dot_product_attention (the reference, and the fast path on
GPUs today). "triton" and "flash" are the fused kernels of their own issues; until they land they
raise BackendUnavailableError naming what is missing, as does any unknown name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vigface.errors import BackendUnavailableError

BACKENDS = ("sdpa", "triton", "flash")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for (N, heads, tokens, head_dim) tensors."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend in ("triton", "flash"):
        raise BackendUnavailableError(
            f"attention backend {backend!r} is not available in this build yet "
            "(the fused kernels come with the Triton/flash-attention issues); use backend='sdpa'"
        )
    raise BackendUnavailableError(
        f"attention backend {backend!r} is unknown; choose one of {', '.join(BACKENDS)}"
    )


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The textbook formula, in fp32: the oracle every attention kernel is tested against."""
    scores = q.float() @ k.float().transpose(-1, -2) / q.shape[-1] ** 0.5
    return (scores.softmax(-1) @ v.float()).to(q.dtype)
