"""A labelled image set read for evaluation: images, labels and (for generated sets) each label's kind.

Evaluation reads whole identities, so limits are per identity (`max_per_id` images of each of at
most `max_ids` identities, taken in label order), which keeps genuine pairs intact.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vigface.errors import DataFormatError, VigfaceError


@dataclass
class LabelledSet:
    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray  # int64 (N,)
    kinds: np.ndarray | None = None  # "real" | "virtual" per image, for a vigface-gen output

    def select(self, mask: np.ndarray) -> LabelledSet:
        kinds = None if self.kinds is None else self.kinds[mask]
        return LabelledSet(self.images[mask], self.labels[mask], kinds)


def generation_kinds(path: str | os.PathLike) -> dict[int, tuple[str, int]] | None:
    """{label: (kind, prototype index)} from a vigface-gen output's generation.json, else None."""
    path = Path(path)
    folder = path.parent if path.suffix == ".rec" else path
    meta = folder / "generation.json"
    if not meta.is_file():
        return None
    try:
        labels = json.loads(meta.read_text())["labels"]
        return {int(k): (str(v[0]), int(v[1])) for k, v in labels.items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise DataFormatError(meta, f"not a valid generation description ({exc})") from None


def _chosen_rows(labels: np.ndarray, max_ids: int | None, max_per_id: int | None) -> np.ndarray:
    """Row numbers of the first `max_ids` labels (ascending), each its first `max_per_id` rows.

    One stable sort instead of a scan per label: a CASIA-sized set (0.5 M rows, 10 K ids) would
    otherwise take 5e9 comparisons before anything is decoded."""
    order = np.argsort(labels, kind="stable")  # by label, file order within a label
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    group = np.cumsum(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]]) - 1  # label rank per row
    rank_in_group = np.arange(len(order)) - starts[group]
    keep = np.ones(len(order), dtype=bool)
    if max_ids is not None:
        keep &= group < max_ids
    if max_per_id is not None:
        keep &= rank_in_group < max_per_id
    return order[keep]


def available_memory() -> int | None:
    """Bytes of physical memory free now (None where the OS does not say)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _check_fits_in_memory(path, needed: int, images: int) -> None:
    """Refuse up front what would end in the OS killing the process half-way through decoding."""
    free = available_memory()
    if free is not None and needed > 0.8 * free:
        raise VigfaceError(
            f"{path}: decoding the {images:,} chosen images needs {needed / 2**30:.1f} GiB, but only "
            f"{free / 2**30:.1f} GiB of memory is free; measure fewer identities or images "
            "(--max-ids / --max-per-id, or --real-max-ids for a cfg sweep)"
        )


def read_labelled_set(
    path: str | os.PathLike, *, max_ids: int | None = None, max_per_id: int | None = None
) -> LabelledSet:
    """Decode (a per-identity subset of) train.rec / an image folder into memory."""
    from vigface.data.loaders.source import open_face_dataset

    dataset = open_face_dataset(path)
    labels = np.asarray(dataset.labels, dtype=np.int64)
    if not len(labels):
        raise VigfaceError(f"{path}: the dataset holds no images")
    index = _chosen_rows(labels, max_ids, max_per_id)
    first, _ = dataset[int(index[0])]
    _check_fits_in_memory(path, len(index) * first.nbytes, len(index))
    images = np.empty((len(index), *first.shape), dtype=np.uint8)
    for n, i in enumerate(index):
        image, _ = dataset[int(i)]
        if image.shape != first.shape:
            raise DataFormatError(
                path, f"image {i} has shape {image.shape}, image {index[0]} has {first.shape}"
            )
        images[n] = image
    kinds_map = generation_kinds(path)
    kinds = None
    if kinds_map is not None:
        kinds = np.array([kinds_map.get(int(label), ("unknown", -1))[0] for label in labels[index]])
    return LabelledSet(images, labels[index], kinds)
