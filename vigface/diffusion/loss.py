"""The stage-2 training loss (paper eq. 8) with condition dropout for classifier-free guidance.

    x_t   = q_sample(x0, t, eps),  t ~ U{0..T-1},  eps ~ N(0, I)
    x0^   = D(x_t, t, c, pose)                          (or from v^ when predicting v)
    loss  = |x0^ - x0|^2  (|v^ - v|^2 for v)  +  lambda |f(x0^) - f(x0)|^2

f is the frozen stage-1 backbone: its L2-normalised embedding, so the identity term is
2 - 2 cos(f(x0^), f(x0)) and stays on the scale of the pixel term. Gradients flow through x0^
into the denoiser only. With probability `drop_prob` (10 %) a sample's FR embedding and pose
image are zeroed, which trains the unconditional model that guidance needs.

Beyond the paper, off by default (`virtual_weight` 0): extra rows with virtual conditions and no
pixel target, whose x0 estimate must embed at its condition (`VirtualRows`, see diffusion_loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vigface.diffusion.schedule import NoiseSchedule


def identity_features(fr_backbone: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised FR embeddings of images in [-1, 1], resized to the backbone's input size.

    Shrunk by area averaging, as stage 1 trained on its images and as `vigface.fr.embed` embeds
    them, so f(x0) lies where the prototypes were learned (a bilinear filter put the stored toy
    images at cos 0.9957 from that, a floor of 0.009 under the identity term); enlarged bilinearly
    (a smaller denoiser than the FR input), which keeps gradients smooth."""
    size = fr_backbone.config.input_size if hasattr(fr_backbone, "config") else 112
    if images.shape[-1] > size:
        images = F.interpolate(images, size=(size, size), mode="area")
    elif images.shape[-1] < size:
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


@dataclass
class VirtualRows:
    """Inputs of the virtual-identity term: noisy images x_t at timesteps t, unit virtual
    conditions cond (the targets of their own embeddings), pose images or None."""

    x_t: torch.Tensor
    t: torch.Tensor
    cond: torch.Tensor
    pose: torch.Tensor | None


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
    virtual: VirtualRows | None = None,
    virtual_weight: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """Mean loss over the batch and its parts (detached). All randomness is passed in (t, noise, drop).

    `target_features`: f(x0) if the caller has it already (the trainer's condition is exactly it).
    `virtual`: rows for the virtual-identity term (beyond the paper, off by default):
    virtual_weight * |f(x0^(x_t, t, c_v)) - c_v|^2, no pixel target. The paper's stage 2 sees only
    real images' embeddings, so at toy scale (100 identities in a 128-d space) a virtual prototype
    is a condition the denoiser never met and its images lean on the nearest real identity; this
    asks the x0 estimate at high noise, where the condition decides the face, to carry the virtual
    identity itself. Its rows share the batch's one denoiser call (one forward for DDP).
    """
    cond, pose = drop_conditions(cond, pose, drop)
    x_t = schedule.q_sample(x0, t, noise)
    n = x0.shape[0]
    target = schedule.v_target(x0, t, noise) if prediction == "v" else x0
    if virtual is not None:
        if fr_backbone is None:
            raise ValueError("diffusion_loss: the virtual-identity term needs fr_backbone")
        x_t, t = torch.cat([x_t, virtual.x_t]), torch.cat([t, virtual.t])
        cond = torch.cat([cond, virtual.cond])
        pose = None if pose is None else torch.cat([pose, virtual.pose])
    out = denoiser(x_t, t, cond, pose).float()
    x0_hat = schedule.x0_from_v(x_t, t, out) if prediction == "v" else out
    if virtual is not None:
        x0_hat_virtual, out, x0_hat = x0_hat[n:], out[:n], x0_hat[:n]
    pixel = (out - target).pow(2).flatten(1).sum(1).mean() / x0[0].numel()  # per-pixel mean
    parts = {"pixel": pixel.detach()}
    loss = pixel
    if virtual is not None:
        f_virtual = identity_features(fr_backbone, x0_hat_virtual)
        term = (f_virtual - virtual.cond).pow(2).sum(1).mean()
        parts["virtual"] = term.detach()
        loss = loss + virtual_weight * term
    if fr_backbone is not None and identity_weight > 0:
        f_real = target_features
        if f_real is None:
            with torch.no_grad():
                f_real = identity_features(fr_backbone, x0)
        f_hat = identity_features(fr_backbone, x0_hat)
        # Every row, the ~10 % whose condition was dropped too (the paper does not say): there the
        # unconditional model is asked for the identity x_t still shows, which it can see at low t.
        ident = (f_hat - f_real).pow(2).sum(1).mean()
        parts["identity"] = ident.detach()
        loss = loss + identity_weight * ident
    return loss, parts


def spread_around(prototypes: torch.Tensor, noise: torch.Tensor, cos: torch.Tensor | float) -> torch.Tensor:
    """Unit vectors at about cosine `cos` from each unit prototype: normalize(p + tan(acos(cos)) z / sqrt(d)).

    In d dimensions a Gaussian z is nearly orthogonal to p with |z| ~ sqrt(d), so the result sits at
    cosine ~ 1 / sqrt(1 + tan^2) = cos: virtual conditions spread like real images' embeddings
    spread around their own prototypes (the paper's eq. 5 does the same for stage 1). `cos` may be
    a 0-d tensor on the device (no host sync).
    """
    cos = torch.as_tensor(cos, dtype=prototypes.dtype, device=prototypes.device).clamp(-1.0, 1.0)
    spread = torch.tan(torch.acos(cos)) / math.sqrt(prototypes.shape[1])
    return F.normalize(prototypes + spread * noise, dim=1)
