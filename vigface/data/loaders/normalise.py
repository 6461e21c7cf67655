"""From decoded uint8 images to model input: float in [-1, 1], NCHW, on the target device.

Exactly `vigface.fr.data.prepare_batch`'s arithmetic (x / 127.5 - 1, area resize, mirror where
the flip mask says), so the torch loader gives the trainers the tensors they had before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vigface.fr.rng import step_generator


def flip_mask(seed: int, step: int, rank: int, n: int) -> torch.Tensor:
    """(n,) bool: which images of global step `step` on `rank` are mirrored (prepare_batch's draw)."""
    return torch.rand(n, generator=step_generator(seed, step, "flip", rank)) < 0.5


def resize_to(x: torch.Tensor, image_size: int | None) -> torch.Tensor:
    """Area-resize NCHW to image_size x image_size (None or the same size: unchanged)."""
    if image_size is not None and (x.shape[-1] != image_size or x.shape[-2] != image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="area")
    return x


def normalise_uint8(
    images: torch.Tensor, *, device: torch.device, image_size: int | None, mirror: torch.Tensor | None
) -> torch.Tensor:
    """uint8 (b, H, W, 3) -> float32 (b, 3, S, S) in [-1, 1] on `device`, mirrored where `mirror`."""
    # Plain NCHW strides: a bare .float() of the permuted view would keep NHWC memory, which the
    # model then receives unasked (torch 2.13's CPU backward crashed on such batches with one
    # thread). Channels-last is the loader's channels_last option, applied after this.
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2)
    x = x.to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1.0)
    x = resize_to(x, image_size)
    if mirror is not None:
        x = torch.where(mirror.to(device)[:, None, None, None], x.flip(-1), x)
    return x
