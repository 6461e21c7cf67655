"""The 5-point landmarks table of a training source: one (5, 2) row per image, in dataset order.

Where a table comes from, in this order:

1. an explicit path: `.npy` of shape (N, 5, 2), or `.jsonl` with one object per image,
   {"key": <record key>, "landmarks": [[x, y] * 5]} for a .rec, or {"path": "<identity>/<n>.jpg",
   "landmarks": ...} for an image folder;
2. beside a .rec: `<stem>_landmarks.npy` (row i = record key i + 1, what `vigface data toy` and
   `vigface data align --format rec` write), or `<stem>_landmarks.jsonl`;
3. an image folder's manifest ("landmarks" field of each line).

A row that an image lacks is NaN; the loaders skip such images with a warning, like corrupt ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from vigface.data.landmarks_npy import read_landmarks_npy
from vigface.errors import DataFormatError, VigfaceError


def _from_jsonl(path: Path, names: list, field: str) -> np.ndarray:
    """Rows matched by `field` ("key" or "path") against `names` (one per image, dataset order)."""
    row_of = {name: row for row, name in enumerate(names)}
    table = np.full((len(names), 5, 2), np.nan, dtype=np.float32)
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                name = entry[field]
                points = np.asarray(entry["landmarks"], dtype=np.float32)
            except (ValueError, KeyError, TypeError) as err:
                raise DataFormatError(
                    path, f'line {line_no}: expected {{"{field}", "landmarks"}} JSON ({err!r})'
                ) from None
            if points.shape != (5, 2):
                raise DataFormatError(path, f"line {line_no}: landmarks must be 5 (x, y) points")
            if name not in row_of:
                raise DataFormatError(
                    path, f'line {line_no}: "{field}" {name!r} is not an image of the source'
                )
            table[row_of[name]] = points
    return table


def read_landmarks_table(
    path: str | os.PathLike, *, keys: list[int] | None = None, paths: list[str] | None = None, n: int
) -> np.ndarray:
    """(n, 5, 2) float32 from a .npy or .jsonl; jsonl rows match `keys` (a .rec) or `paths` (a folder)."""
    path = Path(path)
    if not path.is_file():
        raise VigfaceError(f"landmarks: {path} is not a file")
    if path.suffix == ".npy":
        return read_landmarks_npy(path, n, f"{n} images")
    if path.suffix == ".jsonl":
        if keys is not None:
            return _from_jsonl(path, list(keys), "key")
        return _from_jsonl(path, list(paths or []), "path")
    raise VigfaceError(f"landmarks: {path} must be a .npy or .jsonl file")


def default_landmarks_path(rec_path: Path) -> Path | None:
    """`<stem>_landmarks.npy` or `.jsonl` beside a .rec, if one exists."""
    for suffix in (".npy", ".jsonl"):
        candidate = rec_path.with_name(f"{rec_path.stem}_landmarks{suffix}")
        if candidate.is_file():
            return candidate
    return None
