"""The stage-2 training loss (paper eq. 8) with condition dropout for classifier-free guidance.

    x_t   = q_sample(x0, t, eps),  t ~ U{0..T-1},  eps ~ N(0, I)
    x0^   = D(x_t, t, c, pose)                          (or from v^ when predicting v)
    loss  = |x0^ - x0|^2  (|v^ - v|^2 for v)  +  lambda |f(x0^) - f(x0)|^2

f is the frozen stage-1 backbone: its L2-normalised embedding, so the identity term is
2 - 2 cos(f(x0^), f(x0)) and stays on the scale of the pixel term. Gradients flow through x0^
into the denoiser only. With probability `drop_prob` (10 %) a sample's FR embedding and pose
image are zeroed, which trains the unconditional model that guidance needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vigface.diffusion.schedule import NoiseSchedule


def identity_features(fr_backbone: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised FR embeddings of images in [-1, 1], resized to the backbone's input size."""
    size = fr_backbone.config.input_size if hasattr(fr_backbone, "config") else 112
    if images.shape[-1] != size:
        images = F.interpolate(
            images, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    return F.normalize(fr_backbone(images).float(), dim=1)


def drop_conditions(
    cond: torch.Tensor, pose: torch.Tensor | None, drop: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Zero the condition (and pose image) of rows where `drop` (N,) is True."""
    keep = (~drop).to(cond.dtype)
    cond = cond * keep[:, None]
    if pose is not None:
        pose = pose * keep.view(-1, 1, 1, 1).to(pose.dtype)
    return cond, pose


def diffusion_loss(
    denoiser: torch.nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    cond: torch.Tensor,
    pose: torch.Tensor | None,
    *,
    t: torch.Tensor,
    noise: torch.Tensor,
    drop: torch.Tensor,
    fr_backbone: torch.nn.Module | None = None,
    identity_weight: float = 0.0,
    prediction: str = "x0",
    target_features: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Mean loss over the batch and its parts (detached). All randomness is passed in (t, noise, drop).

    `target_features`: f(x0) if the caller has it already (the trainer's condition is exactly it).
    """
    cond, pose = drop_conditions(cond, pose, drop)
    x_t = schedule.q_sample(x0, t, noise)
    out = denoiser(x_t, t, cond, pose).float()
    if prediction == "v":
        target = schedule.v_target(x0, t, noise)
        x0_hat = schedule.x0_from_v(x_t, t, out)
    else:
        target = x0
        x0_hat = out
    pixel = (out - target).pow(2).flatten(1).sum(1).mean() / x0[0].numel()  # per-pixel mean
    parts = {"pixel": pixel.detach()}
    loss = pixel
    if fr_backbone is not None and identity_weight > 0:
        f_real = target_features
        if f_real is None:
            with torch.no_grad():
                f_real = identity_features(fr_backbone, x0)
        f_hat = identity_features(fr_backbone, x0_hat)
        ident = (f_hat - f_real).pow(2).sum(1).mean()
        parts["identity"] = ident.detach()
        loss = loss + identity_weight * ident
    return loss, parts
