"""loader="torch": the reference and fallback. DataLoader workers decode (PIL) and align (vigface._C).

Workers return uint8 HWC images; the main process moves a batch to the device and normalises it
there (`normalise_uint8`, the arithmetic of `vigface.fr.data.prepare_batch`). Alignment is
`vigface.data.align.align_faces`, the function `vigface data align` runs, so an aligned image is
bit-identical to what that command writes (before it encodes the file).

Errors never cross the worker boundary as exceptions (a worker cannot re-raise a VigfaceError
faithfully): an image that fails comes back as its reason, and the batch goes on without it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from vigface.data.align import align_faces
from vigface.data.images import decode_image
from vigface.data.loaders.base import FaceLoader, Job, Produced
from vigface.data.loaders.normalise import normalise_uint8
from vigface.errors import VigfaceError


class DecodeAlign(torch.utils.data.Dataset):
    """ds[i] -> (i, uint8 HWC image, None), or (i, None, reason) for an image that failed."""

    def __init__(self, source, aligned: bool, image_size: int):
        self.source, self.aligned, self.image_size = source, aligned, image_size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        try:
            image = decode_image(self.source.encoded(i), self.source.describe(i))
            if not self.aligned:
                # One thread: the workers are the parallelism.
                image, _ = align_faces(image, self.source.landmarks[i], self.image_size, num_threads=1)
        except VigfaceError as err:
            return i, None, str(err)
        return i, image, None


def collate_kept(items) -> tuple[np.ndarray, torch.Tensor | None, list]:
    """(positions of usable images, their stacked uint8 (b, H, W, 3) or None, [(index, reason)])."""
    kept = [pos for pos, (_, image, _) in enumerate(items) if image is not None]
    failed = [(i, reason) for i, image, reason in items if image is None]
    if not kept:
        return np.zeros(0, dtype=np.int64), None, failed
    shapes = {items[pos][1].shape for pos in kept}
    if len(shapes) > 1:
        # Not a corrupt file but a dataset of mixed sizes: a configuration error, reported as such.
        return np.asarray(kept), None, [(-1, f"images in one batch differ in shape: {sorted(shapes)}")]
    images = torch.from_numpy(np.stack([items[pos][1] for pos in kept]))
    return np.asarray(kept, dtype=np.int64), images, failed


class TorchLoader(FaceLoader):
    name = "torch"

    def _produce(self, jobs: list[Job]) -> Iterator[Produced]:
        o = self.options
        dataset = DecodeAlign(self.source, o.aligned, o.image_size)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=[job.indices.tolist() for job in jobs],
            num_workers=o.workers,
            collate_fn=collate_kept,
            pin_memory=o.device.type == "cuda",
        )
        for job, (kept, images, failed) in zip(jobs, loader, strict=True):
            if failed and failed[0][0] == -1:
                raise VigfaceError(
                    f"{self.source.path}: {failed[0][1]}; set aligned=False or resize the dataset"
                )
            if images is None:
                yield Produced(job, kept, None, failed)
                continue
            mirror = job.mirror[torch.from_numpy(kept)] if job.mirror is not None else None
            x = normalise_uint8(images, device=o.device, image_size=o.image_size, mirror=mirror)
            yield Produced(job, kept, x, failed)
