"""The compile engine: the denoiser through torch.compile (Inductor), optionally with fp8 linears.

    mode "max-autotune" on CUDA (Triton GEMM/attention autotuning; the first call of each batch
    shape takes minutes at ViT-B), the default mode on CPU, where max-autotune only adds time.
    fullgraph=True: a graph break would silently fall back to Python per op, so it is an error.
    dynamic=False: one specialised graph per batch size; generation uses one or two sizes.

Precisions: fp32, bf16, fp16 (weights cast), and fp8: the transformer blocks' linears in e4m3
through torch._scaled_mm (fp8.py) on top of bf16 (CUDA, sm_89+) or float32 (CPU, numbers only).
The sampling loop is the base engine's: one compiled forward + the fused update per step.
"""

from __future__ import annotations

import copy

import torch

from vigface.diffusion.denoiser import Denoiser
from vigface.diffusion.schedule import NoiseSchedule
from vigface.engines.base import DTYPES, Engine, check_precision, engine_model, reference_denoiser
from vigface.engines.fp8 import convert_block_linears_to_fp8, fp8_supported
from vigface.errors import BackendUnavailableError


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
    ):
        check_precision(self.name, precision, self.precisions)
        super().__init__(denoiser.config, schedule, device, precision)
        if precision == "fp8":
            ok, why = fp8_supported(self.device)
            if not ok:
                raise BackendUnavailableError(f"engine 'compile' precision 'fp8': {why}")
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            self.dtype = DTYPES[precision]
        model = engine_model(reference_denoiser(denoiser), self.device, self.dtype)
        if precision == "fp8":
            model = _fp8_copy(model)
        self.model = model
        if mode is None and backend == "inductor" and self.device.type == "cuda":
            mode = "max-autotune"
        self.backend, self.mode = backend, mode
        self.compiled = torch.compile(model, backend=backend, mode=mode, fullgraph=True, dynamic=False)

    def describe(self) -> dict:
        return {**super().describe(), "backend": self.backend, "mode": self.mode}

    @torch.no_grad()
    def denoise(self, x_t, t, cond, pose=None):
        p = None if pose is None else pose.to(self.dtype)
        return self.compiled(x_t.to(self.dtype), t, cond.to(self.dtype), p).float()


def _fp8_copy(model: Denoiser) -> Denoiser:
    model = copy.deepcopy(model)
    if convert_block_linears_to_fp8(model) == 0:
        raise BackendUnavailableError(
            "engine 'compile' precision 'fp8': no linear of this denoiser has widths that are multiples of 16"
        )
    return model
