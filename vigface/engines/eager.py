"""The eager engine: the denoiser called as a plain PyTorch module, and the reference samplers.

This is the baseline every other engine is measured against, in speed and in numbers: `sample`
runs exactly the reference code path (guided_x0 of cfg.py, ddim_sample / dpm_solver_pp_sample),
so what `vigface-gen --engine eager` writes is the same, byte for byte, as before the engines
existed. precision "bf16" / "fp16" runs a cast copy of the weights (the loop stays float32).
"""

from __future__ import annotations

import torch

from vigface.choices import SAMPLER_SPACING, SAMPLERS
from vigface.diffusion.cfg import guided_x0
from vigface.diffusion.ddim import ddim_sample
from vigface.diffusion.denoiser import Denoiser
from vigface.diffusion.dpm_solver import dpm_solver_pp_sample
from vigface.diffusion.schedule import NoiseSchedule
from vigface.engines.base import DTYPES, Engine, check_precision, engine_model
from vigface.errors import VigfaceError


class EagerEngine(Engine):
    name = "eager"
    precisions = ("fp32", "bf16", "fp16")

    def __init__(self, denoiser: Denoiser, schedule: NoiseSchedule, device="cpu", precision: str = "fp32"):
        check_precision(self.name, precision, self.precisions)
        super().__init__(denoiser.config, schedule, device, precision)
        self.dtype = DTYPES[precision]
        self.model = engine_model(denoiser, self.device, self.dtype)

    @torch.no_grad()
    def denoise(self, x_t, t, cond, pose=None):
        p = None if pose is None else pose.to(self.dtype)
        return self.model(x_t.to(self.dtype), t, cond.to(self.dtype), p).float()

    @torch.no_grad()
    def sample(self, cond, pose, w, *, sampler="ddim", steps=100, x_T=None, generator=None):
        if sampler not in SAMPLERS:
            raise VigfaceError(f"sampler {sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}")
        cond2, pose2, w, x_T = self.prepare(cond, pose, w, x_T, generator)
        cond = cond2[: x_T.shape[0]]

        def predict(x_t, t):
            def denoise(x, tt, c):
                out = self.denoise(x, tt, c, pose2)
                if self.config.prediction == "v":
                    out = self.schedule.x0_from_v(x, tt, out)
                return out

            return guided_x0(denoise, x_t, t, cond, w).clamp(-1, 1)

        if sampler == "ddim":
            return ddim_sample(predict, x_T, self.schedule, steps).clamp(-1, 1)
        spacing = SAMPLER_SPACING[sampler]
        return dpm_solver_pp_sample(predict, x_T, self.schedule, steps, spacing=spacing).clamp(-1, 1)
