"""Sampling faces from a trained denoiser: load it, condition on prototypes, guide, decode to uint8.

    sampler = FaceSampler.load("runs/diffusion")
    images = sampler.sample(cond, pose, w, seeds)      # uint8 (N, S, S, 3)

Deterministic per image: x_T comes from a generator seeded by that image's own seed, and the
samplers offered here (DDIM with eta = 0, DPM-Solver++(2M)) add no noise afterwards, so an image
does not depend on which other images share its batch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from vigface.diffusion.cfg import guided_x0
from vigface.diffusion.ddim import ddim_sample
from vigface.diffusion.denoiser import Denoiser, DenoiserConfig
from vigface.diffusion.dpm_solver import dpm_solver_pp_sample
from vigface.diffusion.schedule import NoiseSchedule
from vigface.errors import BackendUnavailableError, DataFormatError, VigfaceError

SAMPLERS = ("ddim", "dpm++")
ENGINES = ("eager", "compile", "cudagraph", "onnx", "trt")


class FaceSampler:
    def __init__(self, denoiser: Denoiser, schedule: NoiseSchedule, meta: dict | None = None):
        self.denoiser = denoiser.eval()
        self.schedule = schedule
        self.meta = meta or {}

    @classmethod
    def load(
        cls, model_dir: str | os.PathLike, device: str | torch.device = "cpu", engine: str = "eager"
    ) -> FaceSampler:
        if engine != "eager":
            if engine in ENGINES:
                raise BackendUnavailableError(
                    f"engine {engine!r} is not available yet (it comes with the engines issue); "
                    "use --engine eager"
                )
            raise BackendUnavailableError(f"engine {engine!r} is unknown; choose one of {', '.join(ENGINES)}")
        model_dir = Path(model_dir)
        meta_path, weights = model_dir / "denoiser.json", model_dir / "denoiser.safetensors"
        if not meta_path.is_file() or not weights.is_file():
            raise DataFormatError(
                model_dir, "not a trained denoiser folder (needs denoiser.json and denoiser.safetensors)"
            )
        try:
            meta = json.loads(meta_path.read_text())
            config = DenoiserConfig(**meta["denoiser"])
            schedule = NoiseSchedule(meta["schedule"]["kind"], meta["schedule"]["num_steps"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataFormatError(meta_path, f"not a valid denoiser description ({exc})") from None
        model = Denoiser(config)
        try:
            model.load_state_dict(load_file(weights))
        except Exception as exc:  # safetensors' own error type, or a shape mismatch
            raise DataFormatError(weights, f"cannot be loaded into the described denoiser: {exc}") from None
        return cls(model.to(device), schedule, meta)

    @property
    def config(self) -> DenoiserConfig:
        return self.denoiser.config

    def initial_noise(self, seeds: list[int]) -> torch.Tensor:
        s = self.config.image_size
        return torch.stack(
            [torch.randn(3, s, s, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds]
        )

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        pose: torch.Tensor | None,
        w: torch.Tensor,
        seeds: list[int],
        *,
        steps: int = 100,
        sampler: str = "ddim",
    ) -> np.ndarray:
        """uint8 (N, S, S, 3) faces for conditions (N, d), pose images (N, 5, S, S), guidance w (N,)."""
        if sampler not in SAMPLERS:
            raise VigfaceError(f"sampler {sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}")
        device = next(self.denoiser.parameters()).device
        cond = cond.to(device, torch.float32)
        pose = None if pose is None else pose.to(device)
        w = w.to(device, torch.float32)
        x_T = self.initial_noise(seeds).to(device)

        def predict(x_t, t):
            def denoise(x, tt, c):
                p = None
                if pose is not None:  # the unconditional half sees a zero pose image, as in training
                    p = torch.cat([pose, torch.zeros_like(pose)])
                out = self.denoiser(x, tt, c, p).float()
                if self.config.prediction == "v":
                    out = self.schedule.x0_from_v(x, tt, out)
                return out

            return guided_x0(denoise, x_t, t, cond, w).clamp(-1, 1)

        if sampler == "ddim":
            x0 = ddim_sample(predict, x_T, self.schedule, steps)
        else:
            x0 = dpm_solver_pp_sample(predict, x_T, self.schedule, steps)
        images = ((x0.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).cpu().numpy()
