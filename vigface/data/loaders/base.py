"""What every loader shares: options, the epoch plan, flips, corrupt-image bookkeeping, `Batch`.

A loader subclass only turns a list of jobs (dataset indices + flip mask per step) into
normalised images; the plan (`order.rank_batches`), the flip draw (`normalise.flip_mask`) and the
handling of skipped images live here, so "torch" and "dali" read the same images in the same
order and mirror the same ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from vigface.data.loaders.corrupt import CorruptImages
from vigface.data.loaders.normalise import flip_mask, resize_to
from vigface.data.loaders.order import rank_batches, steps_per_epoch
from vigface.data.loaders.source import FaceSource
from vigface.errors import VigfaceError

# What to do about images of several sizes (unaligned photos), named in every loader's error.
ALIGN_HINT = (
    "align them to one size first (vigface data align), or align them on the fly with their landmarks "
    "(vigface-train-fr --no-aligned; make_loader(aligned=False))"
)


@dataclass(frozen=True)
class LoaderOptions:
    batch_size: int  # per rank
    device: torch.device
    rank: int = 0
    world_size: int = 1
    shuffle: bool = True
    seed: int = 0
    drop_last: bool = True
    aligned: bool = True  # False: warp every image to the ArcFace template with its landmarks
    image_size: int | None = 112  # output side (None: as stored); the crop's side when aligning
    flip: bool = False  # mirror half of the images, drawn per (seed, step, rank)
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    workers: int = 2  # torch: worker processes; dali: CPU threads


class Batch(NamedTuple):
    images: torch.Tensor  # (b, 3, S, S) in [-1, 1], `dtype`, on the device
    labels: torch.Tensor  # (b,) int64, on the device
    index: torch.Tensor  # (b,) int64 dataset rows, on the CPU (landmarks, debugging)
    step: int  # step within the epoch (a step whose images all failed is skipped)


class Job(NamedTuple):
    step: int  # step within the epoch
    indices: np.ndarray  # dataset rows of this rank's batch
    mirror: torch.Tensor | None  # (len(indices),) bool, or None without flips


class Produced(NamedTuple):
    job: Job
    kept: np.ndarray  # positions in job.indices that were usable
    images: torch.Tensor | None  # (len(kept), 3, H, W) float32 in [-1, 1] on the device
    failed: list  # (dataset index, reason) of the images skipped


class FaceLoader:
    """Iterate `Batch`es of one epoch: `for batch in loader.epoch(e, first_step)` (or set_epoch + iter)."""

    name = "base"

    def __init__(self, source: FaceSource, options: LoaderOptions):
        self.source = source
        self.options = options
        self.corrupt = CorruptImages(str(source.path))
        self._epoch, self._first_step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        o = self.options
        return steps_per_epoch(len(self.source), o.batch_size, o.world_size, o.drop_last)

    def set_epoch(self, epoch: int, first_step: int = 0) -> None:
        self._epoch, self._first_step = int(epoch), int(first_step)

    def __len__(self) -> int:
        return max(self.steps_per_epoch - self._first_step, 0)

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(self._epoch, self._first_step)

    def jobs(self, epoch: int, first_step: int = 0) -> list[Job]:
        """This rank's steps of `epoch` from `first_step` on, with their flip masks."""
        o = self.options
        batches = rank_batches(
            len(self.source), o.batch_size, o.rank, o.world_size, o.seed, epoch, o.shuffle, o.drop_last,
            first_step,
        )  # fmt: skip
        out = []
        for t, indices in enumerate(batches, start=first_step):
            # The trainers count steps over epochs; the flip draw is keyed by that global step.
            global_step = epoch * self.steps_per_epoch + t
            mirror = flip_mask(o.seed, global_step, o.rank, len(indices)) if o.flip else None
            out.append(Job(t, indices, mirror))
        return out

    def epoch(self, epoch: int, first_step: int = 0) -> Iterator[Batch]:
        o = self.options
        if self.steps_per_epoch == 0:  # an epoch of no batches ended at once, without a word
            raise VigfaceError(
                f"{self.source.path}: {len(self.source)} images, fewer than one global batch "
                f"({o.batch_size} x {o.world_size} ranks) with drop_last; the loader has nothing to give"
            )
        if not 0 <= epoch or not 0 <= first_step <= self.steps_per_epoch:  # -3 gave 3 extra batches
            raise VigfaceError(
                f"loader: epoch must be >= 0 and first_step in [0, {self.steps_per_epoch}], "
                f"got {epoch} and {first_step}"
            )
        self.corrupt.start_epoch()
        delivered = 0
        for produced in self._produce(self.jobs(epoch, first_step)):
            for index, reason in produced.failed:
                self.corrupt.add(index, reason)
            if produced.images is None or len(produced.kept) == 0:
                continue
            x = produced.images if o.image_size is None else resize_to(produced.images, o.image_size)
            x = x.to(o.dtype)
            if o.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            index = torch.from_numpy(np.ascontiguousarray(produced.job.indices[produced.kept]))
            labels = torch.from_numpy(self.source.labels[index.numpy()]).to(o.device, non_blocking=True)
            delivered += len(index)
            yield Batch(x, labels, index, produced.job.step)
        self.corrupt.end_epoch(epoch, delivered)

    def _produce(self, jobs: list[Job]) -> Iterator[Produced]:
        raise NotImplementedError

    def close(self) -> None:
        """Release worker pools / pipelines (a loader is also usable without calling this)."""
