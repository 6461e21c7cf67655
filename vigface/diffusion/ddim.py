"""DDIM sampling (Song et al. 2021, eq. 12) on x0 estimates; the plain-PyTorch reference sampler.

For a decreasing sequence of timesteps t_1 > t_2 > ... > t_S (alpha_bar a_t, a_prev = a at the
next timestep, 1 after the last):

    1. x0 = model estimate of x_0 at (x_t, t)        (guided: eq. 9 of VIGFace)
    2. eps = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t)
    3. sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)
    4. x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z,  z ~ N(0, I)

eta = 0 is deterministic DDIM; eta = 1 is DDPM-like ancestral sampling. The noise of every
step comes from the caller's generator, so a seed per (identity, image) fixes the image.
"""

from __future__ import annotations

import torch

from vigface.diffusion.schedule import NoiseSchedule
from vigface.errors import VigfaceError


def ddim_timesteps(num_train_steps: int, num_steps: int) -> torch.Tensor:
    """`num_steps` evenly spaced timesteps from T-1 down to 0 (int64, strictly decreasing)."""
    if not 1 <= num_steps <= num_train_steps:
        raise VigfaceError(f"DDIM steps must be in 1..{num_train_steps}, got {num_steps}")
    if num_steps == 1:
        return torch.tensor([num_train_steps - 1])
    t = torch.linspace(num_train_steps - 1, 0, num_steps, dtype=torch.float64).round().long()
    return t


def ddim_step(
    x_t: torch.Tensor,
    x0: torch.Tensor,
    a_t: float | torch.Tensor,
    a_prev: float | torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Steps 2-4 above for scalar (or broadcastable) alpha_bar values a_t, a_prev."""
    a_t = torch.as_tensor(a_t, dtype=torch.float64)
    a_prev = torch.as_tensor(a_prev, dtype=torch.float64)
    eps = (x_t - a_t.sqrt().to(x_t.dtype) * x0) / (1 - a_t).sqrt().to(x_t.dtype)
    sigma = eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
    direction = (1 - a_prev - sigma**2).clamp_min(0).sqrt()
    x_prev = a_prev.sqrt().to(x_t.dtype) * x0 + direction.to(x_t.dtype) * eps
    if eta > 0:
        if noise is None:
            raise VigfaceError("ddim_step with eta > 0 needs noise")
        x_prev = x_prev + sigma.to(x_t.dtype) * noise
    return x_prev


@torch.no_grad()
def ddim_sample(
    predict_x0,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    num_steps: int = 100,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    progress=None,
) -> torch.Tensor:
    """Run DDIM from x_T; predict_x0(x_t (N, ...), t (N,) int64) -> x0 estimate (N, ...).

    Returns the final x0 estimate's DDIM update at a_prev = 1, i.e. the predicted clean image.
    """
    alphas = schedule.alphas_cumprod
    steps = ddim_timesteps(schedule.num_steps, num_steps)
    x = x_T
    for i, t in enumerate(steps.tolist()):
        a_t = alphas[t]
        a_prev = alphas[steps[i + 1]] if i + 1 < len(steps) else torch.tensor(1.0, dtype=torch.float64)
        x0 = predict_x0(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
        noise = None
        if eta > 0 and i + 1 < len(steps):
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x = ddim_step(x, x0, a_t, a_prev, eta if i + 1 < len(steps) else 0.0, noise)
        if progress is not None:
            progress(1)
    return x
