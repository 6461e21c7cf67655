"""The compile engine: the denoiser through torch.compile (Inductor), optionally with fp8 linears.

    mode "max-autotune" on CUDA (Triton GEMM/attention autotuning; the first call of each batch
    shape takes minutes at ViT-B), the default mode on CPU, where max-autotune only adds time.
    fullgraph=True: a graph break would silently fall back to Python per op, so it is an error.
    dynamic=False: one specialised graph per batch size; generation uses one or two sizes.

Attention: "sdpa" (torch's fused attention, which Inductor keeps as one op) or "triton" (the
Triton flash-attention kernel as the custom op vigface::flash_attention, opaque to Inductor); the
LayerNorm + modulate steps are always the PyTorch reference here, for Inductor to fuse.

Precisions: fp32, bf16, fp16 (weights cast), and fp8: the transformer blocks' linears in e4m3
through torch._scaled_mm (fp8.py) on top of bf16 (CUDA, sm_89+) or float32 (CPU, numbers only).
The sampling loop is the base engine's: one compiled forward + the fused update per step.
"""

from __future__ import annotations

import copy

import torch

from vigface.diffusion.denoiser import Denoiser
from vigface.diffusion.schedule import NoiseSchedule
from vigface.engines.base import (
    DTYPES,
    Engine,
    check_precision,
    denoiser_with,
    engine_model,
    reference_denoiser,
)
from vigface.engines.fp8 import convert_block_linears_to_fp8, fp8_supported
from vigface.errors import BackendUnavailableError, VigfaceError

ATTENTION = ("sdpa", "triton")


class CompileEngine(Engine):
    name = "compile"
    precisions = ("fp32", "bf16", "fp16", "fp8")

    def __init__(
        self,
        denoiser: Denoiser,
        schedule: NoiseSchedule,
        device="cpu",
        precision: str = "fp32",
        backend: str = "inductor",
        mode: str | None = None,
        attention: str = "sdpa",
    ):
        check_precision(self.name, precision, self.precisions)
        if attention not in ATTENTION:
            raise VigfaceError(
                f"engine 'compile': attention {attention!r} is unknown; choose one of {', '.join(ATTENTION)}"
            )
        super().__init__(denoiser.config, schedule, device, precision)
        if precision == "fp8":
            ok, why = fp8_supported(self.device)
            if not ok:
                raise BackendUnavailableError(f"engine 'compile' precision 'fp8': {why}")
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            self.dtype = DTYPES[precision]
        if attention == "triton":
            _check_triton_attention(self.device)
        model = denoiser_with(reference_denoiser(denoiser), attention=attention)
        model = engine_model(model, self.device, self.dtype)
        if precision == "fp8":
            model = _fp8_copy(model)
        self.model = model
        if mode is None and backend == "inductor" and self.device.type == "cuda":
            mode = "max-autotune"
        self.backend, self.mode, self.attention = backend, mode, attention
        self.compiled = torch.compile(model, backend=backend, mode=mode, fullgraph=True, dynamic=False)

    def describe(self) -> dict:
        return {**super().describe(), "backend": self.backend, "mode": self.mode, "attention": self.attention}

    @torch.no_grad()
    def denoise(self, x_t, t, cond, pose=None):
        p = None if pose is None else pose.to(self.dtype)
        return self.compiled(x_t.to(self.dtype), t, cond.to(self.dtype), p).float()


def _check_triton_attention(device: torch.device) -> None:
    try:
        from vigface.kernels import flash_attention
    except ImportError as exc:
        raise BackendUnavailableError(f"engine 'compile' attention 'triton' needs triton ({exc})") from None
    if device.type != "cuda" and not flash_attention.INTERPRET:
        raise BackendUnavailableError(
            f"engine 'compile' attention 'triton' needs a CUDA device, got {device} "
            "(or TRITON_INTERPRET=1, the slow interpreter)"
        )


def _fp8_copy(model: Denoiser) -> Denoiser:
    model = copy.deepcopy(model)
    if convert_block_linears_to_fp8(model) == 0:
        raise BackendUnavailableError(
            "engine 'compile' precision 'fp8': no linear of this denoiser has widths that are multiples of 16"
        )
    return model
