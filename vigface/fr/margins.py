"""Margin-softmax logits: ArcFace, CosFace, combined and AdaFace on cosine similarities.

All of them change only the target class's cosine, then scale every logit by `s`:

    ArcFace  (Deng et al. 2019, paper eq. 3)  cos(theta_y + m)
             and cos(theta_y) - m sin(m) where theta_y + m > pi (insightface's continuation)
    CosFace  (Wang et al. 2018)               cos(theta_y) - m
    combined (insightface, m1 m2 m3)          cos(m1 theta_y + m2) - m3, m2 = `margin`; where
             m1 theta_y + m2 > pi it continues as cos(theta_y) - cos(theta_0) - 1 - m3,
             theta_0 = (pi - m2) / m1 (continuous there and still falling with theta)
    AdaFace  (Kim et al. 2022)                cos(clip(theta_y - m g, eps, pi - eps)) - (m + m g),
             g = clip(h (|f| - mu) / (sigma + eps), -1, 1) from the feature norm |f| and an EMA
             (t_alpha) of the batch's norm mean mu and std sigma: low-norm (hard) images get an
             angular margin, high-norm ones an additive one.

`MarginHead.logits(cos, labels, norms)` works on a slice of the classes (the rank's shard in
Partial FC): rows whose label is outside the slice pass `-1` and are left unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vigface.fr.margin_config import MarginConfig


class MarginHead(nn.Module):
    """Turns cosines (N, C) into margin-softmax logits; holds AdaFace's norm statistics."""

    def __init__(self, config: MarginConfig):
        super().__init__()
        self.config = config
        # AdaFace's EMA of the batch feature-norm mean and std (initial values from its code).
        self.register_buffer("norm_mean", torch.tensor(20.0))
        self.register_buffer("norm_std", torch.tensor(100.0))

    def adaface_scaler(self, norms: torch.Tensor, update: bool) -> torch.Tensor:
        """g in [-1, 1] per row from feature norms (N,); updates the EMA first, as AdaFace does."""
        c = self.config
        safe = norms.detach().clamp(0.001, 100.0)
        if update and safe.numel() > 1:  # one row has no std (NaN would stay in the EMA for good)
            alpha = c.adaface_t_alpha
            self.norm_mean.copy_(safe.mean() * alpha + (1 - alpha) * self.norm_mean)
            self.norm_std.copy_(safe.std() * alpha + (1 - alpha) * self.norm_std)
        return ((safe - self.norm_mean) / (self.norm_std + 1e-3) * c.adaface_h).clamp(-1.0, 1.0)

    def target_cosine(self, cos_t: torch.Tensor, scaler: torch.Tensor | None) -> torch.Tensor:
        """The margin-modified target cosine for each row's target cosine `cos_t` (N,)."""
        c = self.config
        m = c.margin
        if c.kind == "cosface":
            return cos_t - m
        if c.kind == "arcface":
            sin_t = torch.sqrt((1.0 - cos_t * cos_t).clamp_min(1e-9))
            phi = cos_t * math.cos(m) - sin_t * math.sin(m)  # cos(theta + m)
            # theta + m > pi would wrap around and *raise* the logit: use a linear continuation.
            return torch.where(cos_t > math.cos(math.pi - m), phi, cos_t - math.sin(math.pi - m) * m)
        if c.kind == "combined":
            m1, m3 = c.combined_m1, c.combined_m3
            # not clamp(-1, 1): acos' is -inf at +-1 (an embedding on its prototype), which made the
            # gradients NaN; 1e-6 moves theta there by at most 1.4e-3 rad
            theta = cos_t.clamp(-1.0 + 1e-6, 1.0 - 1e-6).acos()
            theta_0 = (math.pi - m) / m1
            inside = m1 * theta + m <= math.pi
            return torch.where(
                inside,
                torch.cos(m1 * theta + m) - m3,
                cos_t - math.cos(theta_0) - 1.0 - m3,
            )
        g = torch.zeros_like(cos_t) if scaler is None else scaler
        eps = 1e-3
        theta = cos_t.clamp(-1 + eps, 1 - eps).acos()
        theta_m = (theta - m * g).clamp(eps, math.pi - eps)
        return theta_m.cos() - (m + m * g)

    def logits(
        self, cos: torch.Tensor, target_index: torch.Tensor, scaler: torch.Tensor | None = None
    ) -> torch.Tensor:
        """s * cos with each row's target entry replaced by its margin cosine.

        cos: (N, C) cosines against C classes; target_index: (N,) column of the row's class in
        this slice or -1 if the class lives elsewhere; scaler: AdaFace's g (N,) or None (g = 0).
        """
        has = target_index >= 0
        col = target_index.clamp_min(0)
        cos_t = cos.gather(1, col[:, None])[:, 0]
        new_t = self.target_cosine(cos_t, scaler)
        onehot = torch.zeros_like(cos, dtype=torch.bool)
        onehot.scatter_(1, col[:, None], has[:, None])
        return self.config.scale * torch.where(onehot, new_t[:, None].to(cos.dtype), cos)
