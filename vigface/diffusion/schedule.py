"""Noise schedules: the cumulative signal level alpha_bar_t of the forward process (paper eq. 1).

    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,   t = 0 .. T-1,   eps ~ N(0, I)

`cosine` (Nichol & Dhariwal 2021, the paper's default): alpha_bar(t) = f(t) / f(0) with
f(t) = cos^2(((t + 1) / T + s) / (1 + s) * pi / 2), s = 0.008, each beta clipped at 0.999.
`linear` (Ho et al. 2020): beta linear from 1e-4 to 0.02 over T = 1000 steps (rescaled for other T).

Prediction targets convert here too: the denoiser predicts x0 (the paper's §4.2) or
v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (the later DiT version); samplers work on x0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vigface.choices import MAX_TIMESTEPS, SCHEDULES
from vigface.errors import VigfaceError


def cosine_alphas_cumprod(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    def f(t: float) -> float:
        return math.cos((t / num_steps + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - f(i + 1) / f(i), max_beta) for i in range(num_steps)]
    return torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), 0)


def linear_alphas_cumprod(num_steps: int) -> torch.Tensor:
    scale = 1000 / num_steps
    betas = torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


@dataclass(frozen=True)
class NoiseSchedule:
    kind: str = "cosine"
    num_steps: int = 1000

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise VigfaceError(
                f"noise schedule {self.kind!r} is unknown; choose one of {', '.join(SCHEDULES)}"
            )
        if self.num_steps < 2:
            raise VigfaceError(f"noise schedule needs at least 2 steps, got {self.num_steps}")
        if self.num_steps > MAX_TIMESTEPS:  # its float64 tables are built per call: 8 GB at 10**9
            raise VigfaceError(f"noise schedule has at most {MAX_TIMESTEPS} steps, got {self.num_steps}")

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """alpha_bar_t for t = 0 .. T-1, float64 (T,), decreasing from ~1 towards 0."""
        if self.kind == "cosine":
            return cosine_alphas_cumprod(self.num_steps)
        return linear_alphas_cumprod(self.num_steps)

    def alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alpha_bar at integer timesteps t (N,), shaped (N, 1, ..., 1) to broadcast against `like`."""
        a = self.alphas_cumprod.to(like.device)[t.long()].to(like.dtype)
        return a.view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t from x_0 and eps (eq. 1)."""
        a = self.alpha_bar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def v_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bar(t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bar(t, x_t)
        return a.sqrt() * x_t - (1 - a).sqrt() * v

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bar(t, x_t)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()
