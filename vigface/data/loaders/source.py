"""What a loader reads: the encoded images of a .rec or an image folder, their labels and landmarks.

Workers and DALI's Python side only need `encoded(i)` (bytes), so decoding stays in one place per
loader. Reading a .rec uses `os.pread` on one descriptor (safe across threads and forked workers).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vigface.data.image_folder import ImageFolderDataset
from vigface.data.loaders.landmarks import default_landmarks_path, read_landmarks_table
from vigface.data.recordio import FaceRecordDataset
from vigface.errors import DataFormatError, VigfaceError


def open_face_dataset(path: str | os.PathLike) -> FaceRecordDataset | ImageFolderDataset:
    """A labelled face dataset from train.rec, a folder holding train.rec, or an image folder."""
    path = Path(path)
    if path.is_dir() and (path / "train.rec").is_file():
        path = path / "train.rec"
    elif path.is_dir() and (path / "generation.json").is_file() and not (path / "manifest.jsonl").is_file():
        raise DataFormatError(
            path,
            "a vigface-gen output that is not finished (no train.rec yet); run the same vigface-gen "
            "command again to finish it",
        )
    if path.suffix == ".rec":
        if not path.is_file():
            raise DataFormatError(path, "no such RecordIO file")
        return FaceRecordDataset(path)
    if path.is_dir():
        return ImageFolderDataset(path)
    raise DataFormatError(path, "not a .rec file, a folder holding train.rec, or an image folder")


class FaceSource:
    """N labelled encoded images. `landmarks` is (N, 5, 2) float32 when asked for, else None."""

    def __init__(
        self, path: str | os.PathLike, *, landmarks: str | os.PathLike | None = None, need_landmarks=False
    ):
        self.dataset = open_face_dataset(path)
        self.kind = "rec" if isinstance(self.dataset, FaceRecordDataset) else "folder"
        self.path = Path(self.dataset.rec_path) if self.kind == "rec" else Path(path)
        self.labels = np.asarray(self.dataset.labels, dtype=np.int64)
        if len(self.labels) == 0:
            raise VigfaceError(f"source {path}: holds no images")
        self.landmarks: np.ndarray | None = None
        if landmarks is not None or need_landmarks:
            self.landmarks = self._landmarks(landmarks)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    def landmarks_if_any(self) -> np.ndarray | None:
        """The dataset's own landmarks table (beside the .rec, or its manifest's), or None without one."""
        if self.kind == "rec" and default_landmarks_path(self.path) is None:
            return None
        if self.kind == "folder" and self.dataset.landmarks is None:
            return None
        return self._landmarks(None)

    def _landmarks(self, explicit) -> np.ndarray:
        n = len(self)
        if self.kind == "rec":
            keys = self.dataset.image_keys.tolist()
            path = Path(explicit) if explicit is not None else default_landmarks_path(self.path)
            if path is None:
                raise VigfaceError(
                    f"source {self.path}: no landmarks table ({self.path.stem}_landmarks.npy or .jsonl "
                    "beside it); pass --landmarks FILE"
                )
            return read_landmarks_table(path, keys=keys, n=n)
        if explicit is not None:
            return read_landmarks_table(explicit, paths=self.dataset.paths, n=n)
        if self.dataset.landmarks is None:
            raise VigfaceError(
                f"source {self.path}: {self.dataset.why_no_landmarks()}; pass --landmarks FILE"
            )
        return np.asarray(self.dataset.landmarks, dtype=np.float32)

    def encoded(self, i: int) -> bytes:
        """Encoded image i (DataFormatError if its record or file cannot be read)."""
        if self.kind == "rec":
            return self.dataset.encoded(int(i))[0]
        return self.dataset.encoded(int(i))

    def describe(self, i: int) -> str:
        """Where image i lives, for warnings: 'train.rec key 17' or 'id3/4.jpg'."""
        if self.kind == "rec":
            return f"{self.path.name} key {int(self.dataset.image_keys[int(i)])}"
        return self.dataset.paths[int(i)]
