"""One loader interface for both trainers: `make_loader(source, batch_size, ...)`.

    loader = make_loader("toy/train.rec", 128, loader="auto", rank=r, world_size=W, flip=True,
                         device="cuda")
    for images, labels, index, step in loader.epoch(epoch, first_step):
        ...  # images (b, 3, 112, 112) in [-1, 1] on the device, labels (b,) int64

"torch" is the reference (PIL + vigface._C in DataLoader workers) and runs everywhere; its
`decoder` picks PIL, torchvision on the CPU, or nvJPEG on the GPU (decoders.py); "dali"
needs the `dali` extra and runs on the CPU or a CUDA device. Both read the same images in the
same order (`order.rank_batches`), mirror the same ones, and skip the same corrupt ones; their
pixels agree within one intensity level (tests/test_loaders.py). "auto" picks "dali" when DALI
imports (on the 2-core CPU machine it delivered 1.5-2.2x the aligned images/s of "torch" and
about the same with alignment, bench/results/loader_throughput_cpu.json) and "torch" otherwise,
and logs its choice.
"""

from __future__ import annotations

import logging
import os

import torch

from vigface.data.loaders.base import FaceLoader, LoaderOptions
from vigface.data.loaders.decoders import resolve_decoder
from vigface.data.loaders.source import FaceSource
from vigface.errors import VigfaceError

log = logging.getLogger(__name__)

LOADERS = ("auto", "torch", "dali")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise VigfaceError(f"make_loader: {name} must be a positive integer, got {value!r}")
    return value


def resolve_loader(loader: str, device: torch.device) -> str:
    """The concrete loader name for `loader` ("auto" logs what it picked)."""
    from vigface.data.loaders.dali_loader import dali_available, import_dali

    if loader not in LOADERS:
        raise VigfaceError(f"make_loader: loader must be one of {LOADERS}, got {loader!r}")
    if loader == "dali":
        import_dali()  # BackendUnavailableError naming the missing extra
        return "dali"
    if loader == "auto":
        chosen = "dali" if dali_available() else "torch"
        log.info("make_loader: loader='auto' -> %r (device %s)", chosen, device)
        return chosen
    return "torch"


def make_loader(
    source: str | os.PathLike | FaceSource,
    batch_size: int,
    *,
    aligned: bool = True,
    landmarks: str | os.PathLike | None = None,
    loader: str = "auto",
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = True,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    image_size: int | None = 112,
    flip: bool = False,
    workers: int = 2,
    channels_last: bool = False,
    decoder: str = "auto",
) -> FaceLoader:
    """A loader over a .rec (or a folder holding train.rec) or an image folder.

    aligned=True: the images are already aligned crops (resized to image_size if they differ);
    image_size=None keeps the stored size (aligned sources only);
    aligned=False: each image is warped to the image_size x image_size ArcFace template with its
    5 landmarks (`landmarks` file, else <stem>_landmarks.npy/.jsonl beside the .rec, else the
    folder manifest), as `vigface data align` does. rank/world_size shard every epoch (each image
    once across ranks; drop_last drops the last partial global batch). flip mirrors half of the
    images, drawn per (seed, step, rank). workers: worker processes ("torch") or threads ("dali").
    decoder ("torch" only): "pil" | "torchvision" | "nvjpeg" | "auto" (nvjpeg on CUDA when
    torchvision imports, else pil).
    """
    batch_size = _positive("batch_size", batch_size)
    world_size = _positive("world_size", world_size)
    if image_size is not None or not aligned:
        image_size = _positive("image_size", image_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise VigfaceError(f"make_loader: rank must be an integer in [0, {world_size}), got {rank!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise VigfaceError(f"make_loader: workers must be an integer >= 0, got {workers!r}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise VigfaceError(f"make_loader: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:  # int8 held only -1, 0, 1
        raise VigfaceError(
            f"make_loader: dtype must be a floating-point type (images in [-1, 1]), got {dtype!r}"
        )
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise VigfaceError(f"make_loader: device {device!r} is not a torch device") from None
    name = resolve_loader(loader, device)
    chosen_decoder = resolve_decoder(decoder, name, device)
    if decoder == "auto" and name == "torch":
        log.info("make_loader: decoder='auto' -> %r (device %s)", chosen_decoder, device)
    if not isinstance(source, FaceSource):
        source = FaceSource(source, landmarks=landmarks, need_landmarks=not aligned)
    elif not aligned and source.landmarks is None:
        raise VigfaceError("make_loader: aligned=False needs a FaceSource opened with landmarks")
    if not aligned:  # landmarks in another frame: black crops, trained on without a word
        from vigface.data.alignment_check import check_landmarks_fit

        named = f"the landmarks {landmarks}" if landmarks else f"the landmarks of {source.path}"
        check_landmarks_fit(source.landmarks, source.encoded, named)
    options = LoaderOptions(
        batch_size=batch_size, device=device, rank=rank, world_size=world_size, shuffle=bool(shuffle),
        seed=int(seed), drop_last=bool(drop_last), aligned=bool(aligned), image_size=image_size,
        flip=bool(flip), dtype=dtype, channels_last=bool(channels_last), workers=workers,
    )  # fmt: skip
    if name == "dali":
        from vigface.data.loaders.dali_loader import DaliLoader

        return DaliLoader(source, options)
    from vigface.data.loaders.torch_loader import TorchLoader

    return TorchLoader(source, options, decoder=chosen_decoder)
