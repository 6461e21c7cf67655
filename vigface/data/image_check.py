"""`vigface data info PATH --check-images`: decode every image of a dataset and name the bad ones.

`vigface data info` decodes one image; `vigface data merge` copies payloads without decoding them.
A truncated or foreign payload is found by the loaders only at training time (they skip it with a
warning). This pass decodes each image as the PIL loader does and reports, per file, how many do
not read or decode (the first few by where they are and why), the image sizes found, and what makes
a whole file unusable (no images; a verification .bin mixing sizes).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vigface.data.image_folder import MANIFEST, ImageFolderDataset
from vigface.data.images import decode_image
from vigface.data.info import toy_recipe
from vigface.data.recordio import FaceRecordDataset
from vigface.data.verification_bin import read_bin
from vigface.errors import VigfaceError

SHOWN_FAILURES = 10  # bad images named one by one; the rest are counted


@dataclass
class _ImageSet:
    """One file's images: `decode(i)` -> HWC uint8, raising VigfaceError (where and why) if it fails."""

    name: str
    count: int
    decode: Callable[[int], object]
    close: Callable[[], None] = lambda: None


def _rec_set(path: Path) -> _ImageSet:
    ds = FaceRecordDataset(path)
    return _ImageSet(str(path), len(ds), lambda i: ds[i][0], ds.close)


def _folder_set(path: Path) -> _ImageSet:
    ds = ImageFolderDataset(path)
    return _ImageSet(str(path), len(ds), lambda i: ds[i][0])


def _bin_set(path: Path) -> _ImageSet:
    images, _ = read_bin(path)
    return _ImageSet(str(path), len(images), lambda i: decode_image(images[i], path, what=f"image {i}"))


def _image_sets(path: Path) -> list[Callable[[], _ImageSet]]:
    """The files `path` holds images in, as `vigface data info` reads `path`; each opened when checked."""
    if path.is_dir() and (path / "toy.json").is_file():  # a toy world: its training set and pair sets
        _, files = toy_recipe(path)
        return [
            (lambda p=path / name: (_rec_set if p.suffix == ".rec" else _bin_set)(p))
            for name in files
            if name.endswith((".rec", ".bin"))
        ]
    if path.is_dir() and (path / "train.rec").is_file() and not (path / MANIFEST).exists():
        # a merged or generated set, as the trainers take it, or InsightFace's layout: its .bin sets too
        pair_sets = sorted(path.glob("*.bin"))
        return [lambda: _rec_set(path / "train.rec")] + [lambda p=p: _bin_set(p) for p in pair_sets]
    if path.is_dir() and (path / "generation.json").is_file() and not (path / MANIFEST).exists():
        raise VigfaceError(
            f"{path}: a vigface-gen folder that is not finished (no train.rec or {MANIFEST} yet); run the "
            "same vigface-gen command again to finish it"
        )
    if path.is_dir():
        return [lambda: _folder_set(path)]
    if path.suffix == ".rec":
        return [lambda: _rec_set(path)]
    if path.suffix == ".bin":
        return [lambda: _bin_set(path)]
    raise VigfaceError(f"{path}: not a .rec, .bin or folder of images; there are no images to check")


def check_images(path: str | os.PathLike, progress: bool = True) -> dict:
    """Decode every image under `path` (a .rec, a .bin, an image folder, a folder holding train.rec
    and maybe .bin sets, a toy world). Returns {file: {"images", "unreadable" (records or files that
    do not read or decode), "failures" (the first SHOWN_FAILURES, where and why), "sizes" ("HxW":
    count), "problems" (an empty file, a .bin mixing sizes)}}; raises VigfaceError for what cannot be
    opened at all."""
    from tqdm import tqdm

    path = Path(path)
    if not path.exists():
        raise VigfaceError(f"{path}: no such file or folder")
    report = {}
    for open_set in _image_sets(path):
        images = open_set()
        bad, failures, sizes = 0, [], Counter()
        try:
            for i in tqdm(range(images.count), desc=Path(images.name).name, disable=not progress):
                try:
                    image = images.decode(i)
                except VigfaceError as err:  # DataFormatError: the file (offset) and the reason
                    bad += 1
                    if len(failures) < SHOWN_FAILURES:
                        failures.append(str(err))
                    continue
                sizes[f"{image.shape[0]}x{image.shape[1]}"] += 1
        finally:
            images.close()
        problems = []  # what makes the file unusable beyond its single images
        if images.count == 0:
            problems.append("holds no images")
        if images.name.endswith(".bin") and len(sizes) > 1:
            problems.append("mixes image sizes: verification needs one")
        report[images.name] = {
            "images": images.count,
            "unreadable": bad,
            "failures": failures,
            "sizes": dict(sizes.most_common()),
            "problems": problems,
        }
    return report


def found_problems(report: dict) -> bool:
    """Whether a check_images report names anything wrong (the command's exit status 1)."""
    return any(found["unreadable"] or found["problems"] for found in report.values())
