"""Training batches for stage 1: which images each rank sees at step t, decoded and normalised.

Step t of epoch e takes rows [t B, (t + 1) B) of a permutation seeded by (seed, e); rank r takes
its b = B / W rows of that global batch. The order is a function of (seed, e, t) alone, so a
resumed run skips to step t without replaying anything, and W ranks see exactly the global batch
a single process would.

Workers only decode (uint8 HWC); normalisation, resizing and flips happen on the device in
`prepare_batch`, with flips drawn from a (seed, step) generator.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vigface.errors import VigfaceError
from vigface.fr.rng import step_generator, step_seed


class DecodedImages(torch.utils.data.Dataset):
    """ds[i] -> (uint8 HWC image, label), or (None, message) for an unreadable image.

    Errors travel back as messages because a DataLoader worker cannot re-raise a VigfaceError
    (it rebuilds exceptions from a string and falls back to RuntimeError with a traceback).
    """

    def __init__(self, dataset, with_index: bool = False):
        self.dataset = dataset
        self.with_index = with_index  # return (image, i) instead of (image, label)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            image, label = self.dataset[i]
        except VigfaceError as exc:
            return None, str(exc)
        return image, (i if self.with_index else label)


def collate_images(items) -> tuple[torch.Tensor, torch.Tensor]:
    for image, label in items:
        if image is None:
            return None, label  # the error message
    shape = items[0][0].shape
    for image, _ in items:
        if image.shape != shape:
            return None, f"images in one batch differ in shape: {shape} and {image.shape}"
    images = torch.from_numpy(np.stack([image for image, _ in items]))
    labels = torch.tensor([label for _, label in items], dtype=torch.long)
    return images, labels


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This rank's index lists for steps [first_step, steps_per_epoch) of one epoch."""

    def __init__(
        self, n: int, batch: int, rank: int, world_size: int, seed: int, epoch: int, first_step: int = 0
    ):
        self.n, self.batch, self.rank, self.world_size = n, batch, rank, world_size
        self.seed, self.epoch, self.first_step = seed, epoch, first_step

    @property
    def steps_per_epoch(self) -> int:
        return self.n // (self.batch * self.world_size)

    def __len__(self) -> int:
        return max(self.steps_per_epoch - self.first_step, 0)

    def __iter__(self):
        g = torch.Generator().manual_seed(step_seed(self.seed, self.epoch, "order"))
        order = torch.randperm(self.n, generator=g).tolist()
        global_batch = self.batch * self.world_size
        for t in range(self.first_step, self.steps_per_epoch):
            lo = t * global_batch + self.rank * self.batch
            yield order[lo : lo + self.batch]


def prepare_batch(
    images: torch.Tensor,
    *,
    step: int,
    seed: int,
    rank: int,
    input_size: int,
    flip: bool,
    device: torch.device,
    channels_last: bool,
) -> torch.Tensor:
    """uint8 (b, H, W, 3) -> float (b, 3, S, S) in [-1, 1], randomly mirrored per (seed, step, rank)."""
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    if x.shape[-1] != input_size or x.shape[-2] != input_size:
        x = F.interpolate(x, size=(input_size, input_size), mode="area")
    if flip:
        mirror = torch.rand(len(x), generator=step_generator(seed, step, "flip", rank)) < 0.5
        x = torch.where(mirror.to(device)[:, None, None, None], x.flip(-1), x)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
