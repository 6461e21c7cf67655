"""loader="torch": the reference and fallback. DataLoader workers read (and decode) the images.

With decoder "pil" (the reference) or "torchvision", workers decode and align (vigface._C) and
return uint8 HWC images; the main process moves a batch to the device and normalises it there
(`normalise_uint8`, the arithmetic of `vigface.fr.data.prepare_batch`). Alignment is
`vigface.data.align.align_faces`, the function `vigface data align` runs, so an aligned image is
bit-identical to what that command writes (before it encodes the file).

With decoder "nvjpeg" (decoders.py) workers only read the bytes: the main process decodes each
step's JPEGs on the GPU in one batched nvJPEG call and aligns them with the vigface._C CUDA warp
(the same warp specification, within one level of the CPU warp).

Errors never cross the worker boundary as exceptions (a worker cannot re-raise a VigfaceError
faithfully): an image that fails comes back as its reason, and the batch goes on without it.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import numpy as np
import torch

from vigface.data.align import align_faces, arcface_template, estimate_similarity, warp_affine
from vigface.data.images import decode_image
from vigface.data.loaders.base import ALIGN_HINT, FaceLoader, Job, Produced
from vigface.data.loaders.decoders import decode_jpegs_on_gpu, decode_torchvision, read_for_nvjpeg
from vigface.data.loaders.normalise import normalise_uint8
from vigface.errors import VigfaceError


class DecodeAlign(torch.utils.data.Dataset):
    """ds[i] -> (i, payload, is_jpeg_bytes, None), or (i, None, False, reason) for an image that failed.

    payload: the uint8 HWC image (aligned unless the source is), or with decoder="nvjpeg" the raw
    JPEG bytes (is_jpeg_bytes True; other formats come decoded, unaligned).
    """

    def __init__(self, source, aligned: bool, image_size: int, decoder: str = "pil"):
        self.source, self.aligned, self.image_size, self.decoder = source, aligned, image_size, decoder

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        try:
            data, where = self.source.encoded(i), self.source.describe(i)
            if self.decoder == "nvjpeg":
                payload, is_jpeg = read_for_nvjpeg(data, where)
                return i, payload, is_jpeg, None
            decode = decode_torchvision if self.decoder == "torchvision" else decode_image
            image = decode(data, where)
            if not self.aligned:
                # One thread: the workers are the parallelism.
                try:
                    image, _ = align_faces(image, self.source.landmarks[i], self.image_size, num_threads=1)
                except VigfaceError as err:  # it numbers its one row 0: name the image, as DALI's does
                    raise VigfaceError(f"{where}: {err}") from None
        except VigfaceError as err:
            return i, None, False, str(err)
        return i, image, False, None


def collate_kept(items) -> tuple[np.ndarray, torch.Tensor | None, list]:
    """(positions of usable images, their stacked uint8 (b, H, W, 3) or None, [(index, reason)])."""
    kept = [pos for pos, (_, image, _, _) in enumerate(items) if image is not None]
    failed = [(i, reason) for i, image, _, reason in items if image is None]
    if not kept:
        return np.zeros(0, dtype=np.int64), None, failed
    shapes = {items[pos][1].shape for pos in kept}
    if len(shapes) > 1:
        # Not a corrupt file but a dataset of mixed sizes: a configuration error, reported as such.
        return np.asarray(kept), None, [(-1, f"images in one batch differ in shape: {sorted(shapes)}")]
    images = torch.from_numpy(np.stack([items[pos][1] for pos in kept]))
    return np.asarray(kept, dtype=np.int64), images, failed


def collate_payloads(items) -> tuple[np.ndarray, list, list, list]:
    """decoder="nvjpeg": (positions of readable images, their payloads, is-JPEG flags, [(index, reason)])."""
    kept = [pos for pos, (_, payload, _, _) in enumerate(items) if payload is not None]
    failed = [(i, reason) for i, payload, _, reason in items if payload is None]
    return (np.asarray(kept, dtype=np.int64), [items[p][1] for p in kept], [items[p][2] for p in kept],
            failed)  # fmt: skip


def _ignore_stop_signals(worker_id: int) -> None:
    # Ctrl-C and a scheduler's SIGTERM reach the whole process group: the main process stops and shuts
    # the workers down. A worker killed by it first made the main process fail with "DataLoader
    # worker ... is killed by signal: Terminated" (a traceback) instead of stopping cleanly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class TorchLoader(FaceLoader):
    name = "torch"

    def __init__(self, source, options, decoder: str = "pil"):
        super().__init__(source, options)
        self.decoder = decoder

    def _produce(self, jobs: list[Job]) -> Iterator[Produced]:
        o = self.options
        gpu_decode = self.decoder == "nvjpeg"
        dataset = DecodeAlign(self.source, o.aligned, o.image_size, self.decoder)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=[job.indices.tolist() for job in jobs],
            num_workers=o.workers,
            collate_fn=collate_payloads if gpu_decode else collate_kept,
            pin_memory=o.device.type == "cuda" and not gpu_decode,
            worker_init_fn=_ignore_stop_signals if o.workers else None,
        )
        for job, collated in zip(jobs, loader, strict=True):
            if gpu_decode:
                kept, images, failed = self._decode_on_gpu(job, *collated)
            else:
                kept, images, failed = collated
                if failed and failed[0][0] == -1:
                    raise self._mixed_sizes(failed[0][1])
            if images is None:
                yield Produced(job, kept, None, failed)
                continue
            mirror = job.mirror[torch.from_numpy(kept)] if job.mirror is not None else None
            x = normalise_uint8(images, device=o.device, image_size=o.image_size, mirror=mirror)
            yield Produced(job, kept, x, failed)

    def _mixed_sizes(self, what: str) -> VigfaceError:
        return VigfaceError(f"{self.source.path}: {what}; {ALIGN_HINT}")

    def _decode_on_gpu(self, job: Job, kept: np.ndarray, payloads: list, is_jpeg: list, failed: list):
        """nvJPEG-decode (and align) one step's images on the device -> (kept, NHWC uint8 or None, failed)."""
        o = self.options
        jpeg_at = [k for k, j in enumerate(is_jpeg) if j]
        images: list[torch.Tensor | None] = [None] * len(payloads)
        decoded = decode_jpegs_on_gpu([payloads[k] for k in jpeg_at], o.device)
        for k, out in zip(jpeg_at, decoded, strict=True):
            if isinstance(out, str):
                index = int(job.indices[kept[k]])
                failed.append((index, f"{self.source.describe(index)}: {out}"))
            else:
                images[k] = out.permute(1, 2, 0)
        for k, j in enumerate(is_jpeg):
            if not j:
                images[k] = torch.from_numpy(payloads[k]).to(o.device, non_blocking=True)
        usable = [k for k, image in enumerate(images) if image is not None]
        if not usable:
            return kept[:0], None, failed
        shapes = {tuple(images[k].shape) for k in usable}
        if len(shapes) > 1:
            raise self._mixed_sizes(f"images in one batch differ in shape: {sorted(shapes)}")
        kept = kept[usable]
        batch = torch.stack([images[k] for k in usable])
        if not o.aligned:
            kept, batch = self._align_on_gpu(job, kept, batch, failed)
        return kept, batch, failed

    def _align_on_gpu(self, job: Job, kept: np.ndarray, batch: torch.Tensor, failed: list):
        """The CUDA warp to the ArcFace template; images whose landmarks admit no similarity are skipped.

        The matrices are `align_faces`'s (the same similarity, template and warp), computed once here
        so that a bad landmark set drops its image instead of the whole batch.
        """
        o = self.options
        indices = job.indices[kept]
        landmarks = self.source.landmarks[indices]
        template = arcface_template(o.image_size)
        try:
            matrices = estimate_similarity(landmarks, template)
            ok = np.ones(len(kept), dtype=bool)
        except VigfaceError:  # find the bad ones (5 points each: cheap on the CPU)
            matrices, ok = np.zeros((len(kept), 2, 3), dtype=np.float32), np.zeros(len(kept), dtype=bool)
            for k, index in enumerate(indices):
                try:
                    matrices[k], ok[k] = estimate_similarity(landmarks[k], template), True
                except VigfaceError as err:
                    failed.append((int(index), f"{self.source.describe(index)}: {err}"))
        if not ok.all():
            kept, matrices = kept[ok], matrices[ok]
            batch = batch[torch.from_numpy(ok).to(batch.device)]
        if len(kept) == 0:
            return kept, None
        size = (o.image_size, o.image_size)
        return kept, warp_affine(batch.contiguous(), matrices, size, 0, backend="cuda")
