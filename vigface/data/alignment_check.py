"""Do a dataset's landmarks say its faces are aligned? A warning when they do not.

The trainers, generation poses and evaluation all expect aligned crops (the ArcFace template) and
landmarks in that frame. Unaligned images, or aligned images paired with the landmarks of the
original photos, run without any error and give silently wrong models and metrics (IoU against an
unaligned real set rose from 0.31 to 0.67 in a walkthrough). Pixels cannot tell, but landmarks
can: after alignment they lie near the template. Measured here: the median per-image RMS distance
from the template is 3.2 px of 112 (2.8 %) for the toy world's aligned set, the generated sets and
the shipped pose table; 14.6 px of 144 (10 %) for its unaligned set, and 23.8 px when those
144-frame landmarks are read in the 112 frame. The limit sits between, at 8 % of the side.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from vigface.data.align import ARCFACE_TEMPLATE_112
from vigface.errors import VigfaceError, VigfaceWarning

ALIGNED_RMS_LIMIT = 0.08  # median RMS distance from the template, as a fraction of the image side


def template_distance(landmarks: np.ndarray, image_size: int) -> float | None:
    """Median over images of the RMS distance (px) of the 5 points from the template scaled to
    `image_size`; None when no image has all 5 points finite."""
    points = np.asarray(landmarks, dtype=np.float64).reshape(-1, 5, 2)
    points = points[np.isfinite(points).all(axis=(1, 2))]
    if not len(points):
        return None
    template = ARCFACE_TEMPLATE_112 * (image_size / 112.0)
    rms = np.sqrt(((points - template) ** 2).sum(axis=2).mean(axis=1))
    return float(np.median(rms))


def warn_if_not_aligned(landmarks: np.ndarray, image_size: int, what: str) -> bool:
    """Warn (VigfaceWarning) when `landmarks` are far from the template in an `image_size` frame;
    returns whether it warned."""
    distance = template_distance(landmarks, image_size)
    if distance is None or distance <= ALIGNED_RMS_LIMIT * image_size:
        return False
    warnings.warn(
        VigfaceWarning(
            f"{what}: these landmarks do not look like aligned faces in a {image_size}x{image_size} frame "
            f"(median distance from the ArcFace template {distance:.1f} px, "
            f"{100 * distance / image_size:.0f} % of the side; aligned sets measure ~3 %); align the images "
            "first (vigface data align), or pass the landmarks of the aligned images"
        ),
        stacklevel=3,
    )
    return True


def check_dataset_alignment(path_or_source, what: str, name: str | os.PathLike | None = None) -> bool:
    """Warn when the landmarks stored with a dataset (beside a .rec, or in a folder's manifest) say
    its images are not aligned. `path_or_source`: a dataset path, or the FaceSource a loader already
    opened (so its folder is not scanned twice); `name`: how the warning names it (default: its path).
    A dataset without landmarks, or one that cannot be opened, is not checked here (its reader
    reports what is wrong). Returns whether it warned."""
    from vigface.data.loaders.source import FaceSource  # the readers, only when a check runs

    try:
        source = path_or_source if isinstance(path_or_source, FaceSource) else FaceSource(path_or_source)
        table = source.landmarks_if_any()
        if table is None:
            return False
        image, _ = source.dataset[0]
    except (VigfaceError, OSError):
        return False
    if name is None:
        name = source.path if isinstance(path_or_source, FaceSource) else path_or_source
    return warn_if_not_aligned(table, image.shape[0], f"{what} {Path(name)}")


# ---- unaligned images: do their landmarks fit them? ---------------------------------------------

# Median fraction of an aligned crop that comes from inside its image, below which landmarks are
# taken to be in another frame. Measured (16 x 16 grid): the toy world's wild images 1.0; a 112-px
# aligned image read as wild 1.0, one shifted 30 px diagonally 0.5, a crop tight around the template
# ~0.3-0.45; landmarks scaled x10 or shifted by 1000 px 0.0, x and y swapped 0.06-0.25.
CROP_INSIDE_LIMIT = 0.2
FIT_SAMPLE = 64  # images whose size the check reads (from their headers)


def crop_inside_fraction(landmarks: np.ndarray, image_hw: np.ndarray, grid: int = 16) -> np.ndarray:
    """(N,) fraction of each 112-px aligned crop (a grid x grid sample of its pixels) that the
    similarity to the template maps from inside its (H, W) image; NaN where the landmarks admit
    no similarity or the image size is unknown (NaN: it did not decode). A face near the border
    keeps much of its crop; landmarks in another frame (scaled, shifted, x and y swapped) put it
    outside, where the warp fills black."""
    from vigface.data.align import estimate_similarity, invert_affine

    points = np.asarray(landmarks, dtype=np.float64).reshape(-1, 5, 2)
    fraction = np.full(len(points), np.nan)
    centres = (np.arange(grid) + 0.5) * (112.0 / grid) - 0.5
    xs, ys = np.meshgrid(centres, centres)
    crop = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)])  # (3, grid^2), aligned frame
    for n, row in enumerate(points):
        if not np.isfinite(image_hw[n]).all():  # an image that did not decode: no size to judge by
            continue
        try:
            back = invert_affine(estimate_similarity(row, backend="numpy")).astype(np.float64)
        except (VigfaceError, ValueError):  # NaN or degenerate: the loaders skip and name such rows
            continue
        x, y = back @ crop
        h, w = image_hw[n]
        fraction[n] = np.mean((x >= -0.5) & (x <= w - 0.5) & (y >= -0.5) & (y <= h - 0.5))
    return fraction


def check_landmarks_fit(landmarks: np.ndarray, encoded, what: str) -> None:
    """Refuse unaligned images whose landmarks put most aligned crops outside the images: training
    (--no-aligned) and `vigface data align` turned them into black squares without a word.
    `landmarks`: (N, 5, 2) in the images' frames; `encoded(i)` -> image i's encoded bytes. Checks
    FIT_SAMPLE images spread over the set, by the sizes in their headers (every rank runs this;
    decoding 64 multi-megapixel photos took seconds)."""
    from vigface.data.images import image_shape

    n = len(landmarks)
    if n == 0:
        return
    rows = np.unique(np.linspace(0, n - 1, min(n, FIT_SAMPLE)).round().astype(np.int64))
    shapes = []
    for i in rows:
        try:
            shapes.append(image_shape(encoded(int(i))))
        except (VigfaceError, OSError):  # a corrupt image: the loaders name it; not this check's
            shapes.append((np.nan, np.nan))
    fraction = crop_inside_fraction(np.asarray(landmarks)[rows], np.asarray(shapes, dtype=np.float64))
    fraction = fraction[np.isfinite(fraction)]
    if len(fraction) and np.median(fraction) < CROP_INSIDE_LIMIT:
        raise VigfaceError(
            f"{what}: these landmarks put the aligned crops mostly outside their images (median "
            f"{100 * np.median(fraction):.0f} % of a crop inside, over {len(fraction)} sampled images; a "
            "face near the border keeps most of it): are they in another frame (scaled, shifted, or x "
            "and y swapped)? The crops would be black"
        )
