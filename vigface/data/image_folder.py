"""Image-folder datasets: `root/<identity>/<n>.jpg` plus `root/manifest.jsonl`.

Each manifest line is one JSON object:

    {"path": "<identity>/<n>.jpg", "label": 3, "identity": "<identity>", "landmarks": [[x, y], ...5]}

("landmarks" is optional). Without a manifest, identity folders are sorted by name and label =
position in that order, as torchvision's ImageFolder labels them when the root holds no hidden
folders (skipped here, counted there). Images are the files directly in each identity folder (no
subfolders), in natural order (2.jpg before 10.jpg; torchvision sorts by name), with the
extensions the decoder takes: .jpg/.jpeg/.png/.bmp/.webp/.tif/.tiff. An identity folder without
such images is refused, as torchvision refuses it (it would be a class without images).
"""

from __future__ import annotations

import json
import math
import operator
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import numpy as np

from vigface.data.files import fsync_dir
from vigface.data.images import decode_image, encode_image, sniff_image_format
from vigface.data.output_folder import process_running
from vigface.data.recordio import MAX_LABEL
from vigface.errors import DataFormatError, VigfaceError, VigfaceWarning

MANIFEST = "manifest.jsonl"
# Present while ImageFolderWriter writes a folder, and after a write that did not finish.
UNFINISHED = ".vigface-unfinished"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")  # = images._DECODE_FORMATS
_EXTENSION_OF_FORMAT = {"jpeg": ".jpg", "jpg": ".jpg", "png": ".png"}


def _check_identity(identity) -> str:
    # The identity becomes a directory name: one plain path component, nothing that escapes root.
    name = str(identity)
    if name in ("", ".", "..") or name.startswith(".") or any(c in name for c in "/\\\0\n\r"):
        raise VigfaceError(f"identity {identity!r} cannot be used as a folder name")
    return name


def _check_landmarks(landmarks) -> list[list[float]]:
    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape != (5, 2) or not np.all(np.isfinite(points)):
        raise VigfaceError(f"landmarks must be 5 finite (x, y) points, got shape {points.shape}")
    # Four decimals (1e-4 px) keep the manifest small without losing useful precision.
    return [[round(float(x), 4), round(float(y), 4)] for x, y in points]


class ImageFolderWriter:
    """Write images to `root/<identity>/<n>.<ext>`, streaming; the manifest appears at close().

    Every image is written to a temporary name and renamed; manifest lines go to a temporary
    manifest that close() renames into place, so a folder with a manifest is always complete.
    Until then the folder holds UNFINISHED: readers refuse it (a write that stopped part-way
    left images that passed for a whole dataset without a manifest), and an existing manifest
    is removed before the first image is replaced (it vouched for a mix of old and new images).
    """

    def __init__(
        self, root: str | os.PathLike, *, fmt: str = "jpeg", quality: int = 95, overwrite: bool = False
    ):
        self.root = Path(root)
        if fmt.lower() not in _EXTENSION_OF_FORMAT:
            raise VigfaceError(f"unknown image format {fmt!r}; use 'jpeg' or 'png'")
        self.fmt, self.quality = fmt.lower(), quality
        self.manifest_path = self.root / MANIFEST
        if self.manifest_path.exists() and not overwrite:
            raise VigfaceError(
                f"{self.manifest_path} already exists; pass overwrite=True to replace the folder"
            )
        writing = live_writer(self.root)
        if writing is not None and writing != os.getpid():  # two writers would mix their images
            raise VigfaceError(
                f"{self.root}: process {writing} is writing this folder; let it finish, or stop it"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / UNFINISHED).write_text(f"written by process {os.getpid()}; no {MANIFEST} yet\n")
        self.manifest_path.unlink(missing_ok=True)  # overwrite: the old one lists the old images
        self._tmp_manifest = self.root / f"{MANIFEST}.{os.getpid()}.tmp"
        self._manifest = open(
            self._tmp_manifest, "w", encoding="utf-8", newline="\n"
        )  # closed in close()/abort()
        self._next_number: dict[str, int] = {}
        self._label_of: dict[str, int] = {}
        self._identity_of: dict[int, str] = {}
        self.count = 0
        self._done = False

    def add(self, image: bytes | np.ndarray, label: int, identity: str | None = None, landmarks=None) -> str:
        """Store one image (JPEG/PNG bytes, or a uint8 HWC RGB array to encode); returns its relative path."""
        if self._done:
            raise VigfaceError(f"{self.root}: add() after close()/abort()")
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < MAX_LABEL:
            raise VigfaceError(f"label must be an integer in [0, 2**24), got {label!r}")
        label = int(label)
        identity = f"{label:06d}" if identity is None else _check_identity(identity)
        if self._label_of.setdefault(identity, label) != label:
            raise VigfaceError(
                f"identity {identity!r} already has label {self._label_of[identity]}, got {label}"
            )
        if self._identity_of.setdefault(label, identity) != identity:
            raise VigfaceError(f"label {label} already belongs to identity {self._identity_of[label]!r}")
        if isinstance(image, np.ndarray):
            payload, ext = encode_image(image, self.fmt, self.quality), _EXTENSION_OF_FORMAT[self.fmt]
        else:
            payload = bytes(image)
            kind = sniff_image_format(payload)
            if kind not in _EXTENSION_OF_FORMAT:
                raise VigfaceError(
                    f"image {self.count} is not JPEG or PNG bytes (starts with {payload[:8].hex()})"
                )
            ext = _EXTENSION_OF_FORMAT[kind]
        entry = {"label": label, "identity": identity}
        if landmarks is not None:
            entry["landmarks"] = _check_landmarks(landmarks)

        number = self._next_number.get(identity, 0)
        if number == 0:
            (self.root / identity).mkdir(exist_ok=True)
        self._next_number[identity] = number + 1
        rel = f"{identity}/{number}{ext}"
        target = self.root / rel
        tmp = target.with_name(f"{target.name}.tmp")
        tmp.write_bytes(payload)
        os.replace(tmp, target)
        self._manifest.write(json.dumps({"path": rel, **entry}) + "\n")
        self.count += 1
        return rel

    def close(self) -> None:
        """Move the manifest into place (no-op when already closed)."""
        if self._done:
            return
        self._done = True
        try:
            self._manifest.flush()
            os.fsync(self._manifest.fileno())
            self._manifest.close()
            os.replace(self._tmp_manifest, self.manifest_path)
            (self.root / UNFINISHED).unlink(missing_ok=True)
        except BaseException:
            self.abort()
            raise
        fsync_dir(self.root)

    def abort(self) -> None:
        """Drop the temporary manifest; images already written stay, but no manifest lists them, and
        UNFINISHED stays to say so."""
        self._done = True
        try:
            self._manifest.close()
        except OSError:
            pass
        self._tmp_manifest.unlink(missing_ok=True)

    def __enter__(self) -> ImageFolderWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def live_writer(root: str | os.PathLike) -> int | None:
    """The process named by root's UNFINISHED mark while it still runs; None without a mark, or when
    the writer has gone (a stopped run: the folder may be written again)."""
    try:
        found = re.search(r"process (\d+)", (Path(root) / UNFINISHED).read_text())
    except (OSError, UnicodeDecodeError):
        return None
    if found is None:
        return None
    pid = int(found.group(1))
    return pid if process_running(pid) else None


def write_image_folder(
    root: str | os.PathLike,
    images: Iterable,
    labels: Iterable[int],
    identities: Iterable[str] | None = None,
    landmarks: Iterable | None = None,
    **writer_options,
) -> int:
    """Write (image, label[, identity][, landmarks]) sequences with ImageFolderWriter; returns the count."""
    images, labels = list(images), list(labels)
    identities = [None] * len(images) if identities is None else list(identities)
    landmarks = [None] * len(images) if landmarks is None else list(landmarks)
    if not len(images) == len(labels) == len(identities) == len(landmarks):
        raise VigfaceError("write_image_folder: images, labels, identities and landmarks differ in length")
    with ImageFolderWriter(root, **writer_options) as writer:
        for image, label, identity, points in zip(images, labels, identities, landmarks, strict=True):
            writer.add(image, label, identity, points)
    return writer.count


def _natural_key(name: str) -> list:
    # "2.jpg" before "10.jpg": digit runs compare as numbers (odd positions of the split).
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", name))]


class ImageFolderDataset:
    """root/<identity>/<n>.jpg as a map-style dataset: ds[i] -> (uint8 HWC RGB image, int label)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataFormatError(self.root, "not a directory")
        if (self.root / UNFINISHED).is_file():
            raise DataFormatError(
                self.root,
                "is unfinished: the command writing it stopped part-way (interrupted, a full disk, "
                "a bad input) or is still running; rerun that command to finish it",
            )
        self.manifest_path: Path | None = self.root / MANIFEST
        self.paths: list[str] = []  # relative to root, "/"-separated
        self.identities: list[str] = []
        self._line_numbers: list[int] = []
        labels: list[int] = []
        points: list = []
        if self.manifest_path.is_file():
            self._read_manifest(labels, points)
        else:
            self.manifest_path = None
            self._scan(labels)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.landmarks: np.ndarray | None = None
        if any(p is not None for p in points):
            missing = np.full((5, 2), np.nan)
            self.landmarks = np.asarray([missing if p is None else p for p in points], dtype=np.float32)

    def _read_manifest(self, labels: list, points: list) -> None:
        path = self.manifest_path
        offset = 0
        label_of: dict[str, int] = {}
        identity_of: dict[int, str] = {}
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                here, offset = offset, offset + len(raw)
                if not raw.strip():
                    continue
                try:
                    entry = json.loads(raw.decode("utf-8"))
                    rel, label, identity, lm = self._check_entry(entry)
                    # one identity, one label (as the writer keeps them): a second label for an
                    # identity was trained as a class of its own. Only where the line names its
                    # identity: a hand-written manifest may list flat paths with labels alone.
                    if "identity" in entry:
                        if label_of.setdefault(identity, label) != label:
                            raise ValueError(
                                f"identity {identity!r} has label {label} here, {label_of[identity]} before"
                            )
                        if identity_of.setdefault(label, identity) != identity:
                            raise ValueError(
                                f"label {label} is identity {identity!r} here, {identity_of[label]!r} before"
                            )
                except (ValueError, TypeError) as exc:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
                    raise DataFormatError(path, f"line {lineno}: {exc}", here) from None
                self.paths.append(rel)
                labels.append(label)
                self.identities.append(identity)
                points.append(lm)
                self._line_numbers.append(lineno)

    @staticmethod
    def _check_entry(entry) -> tuple[str, int, str, list | None]:
        if not isinstance(entry, dict):
            raise ValueError(f"expected a JSON object, got {type(entry).__name__}")
        rel = entry.get("path")
        if not isinstance(rel, str) or not rel:
            raise ValueError('"path" must be a non-empty string')
        parts = PurePosixPath(rel).parts
        if rel.startswith("/") or "\\" in rel or ".." in parts or not parts:
            raise ValueError(f'"path" {rel!r} must be a relative path inside the folder')
        label = entry.get("label")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < MAX_LABEL:
            raise ValueError(f'"label" must be an integer in [0, 2**24), got {label!r}')
        identity = entry.get("identity", parts[0])
        if not isinstance(identity, str):
            raise ValueError(f'"identity" must be a string, got {identity!r}')
        lm = entry.get("landmarks")
        if lm is not None:
            ok = (
                isinstance(lm, list)
                and len(lm) == 5
                and all(isinstance(p, list) and len(p) == 2 for p in lm)
                and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    for p in lm
                    for v in p
                )
            )
            if not ok:
                raise ValueError('"landmarks" must be 5 finite [x, y] pairs')
        return rel, label, identity, lm

    def _scan(self, labels: list) -> None:
        identities = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        skipped = []  # image names that are no files: broken links, pipes (a read would fail or block)
        for label, identity in enumerate(identities):
            names = []
            for p in (self.root / identity).iterdir():
                if p.suffix.lower() not in IMAGE_EXTENSIONS or p.name.startswith("."):
                    continue
                if p.is_file():
                    names.append(p.name)
                else:
                    skipped.append(f"{identity}/{p.name}")
            # its label would be a class without images (torchvision's ImageFolder refuses it too)
            if not names:
                raise DataFormatError(
                    self.root / identity,
                    f"identity folder without {'/'.join(IMAGE_EXTENSIONS)} images; remove or fill it",
                )
            for name in sorted(names, key=_natural_key):
                self.paths.append(f"{identity}/{name}")
                labels.append(label)
                self.identities.append(identity)
        if skipped:
            warnings.warn(
                VigfaceWarning(
                    f"{self.root}: skipped {len(skipped)} image name(s) that are not readable files (broken "
                    f"links, pipes), e.g. {', '.join(sorted(skipped)[:3])}"
                ),
                stacklevel=3,
            )
        if not self.paths:
            raise DataFormatError(
                self.root, f"no {MANIFEST} and no {'/'.join(IMAGE_EXTENSIONS)} images in <identity>/ folders"
            )

    def __len__(self) -> int:
        return len(self.paths)

    def why_no_landmarks(self) -> str:
        """Why `landmarks` is None, for the errors of what needs them."""
        if self.manifest_path is not None:
            return f"its {MANIFEST} has no landmarks"
        return f"no {MANIFEST} (a folder of <identity>/ images carries no landmarks)"

    @property
    def num_classes(self) -> int:
        """max label + 1 (the size of a classifier head over these labels)."""
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def path(self, i: int) -> Path:
        """Absolute path of image i."""
        i = operator.index(i)  # as FaceRecordDataset: a float index is a TypeError naming the type
        n = len(self.paths)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images of {self.root}")
        return self.root / self.paths[i]

    def encoded(self, i: int) -> bytes:
        """The file bytes of image i."""
        path = self.path(i)
        try:
            if path.exists() and not path.is_file():  # a folder, or a pipe the read would block on
                raise DataFormatError(path, "not a regular file (listed as an image)")
            return path.read_bytes()
        except FileNotFoundError:
            where = (
                f"{self.manifest_path} line {self._line_numbers[i]}"
                if self.manifest_path
                else "the folder scan"
            )
            raise DataFormatError(path, f"missing image (listed in {where})") from None
        except OSError as exc:
            raise DataFormatError(path, f"cannot read image: {exc}") from None

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return decode_image(self.encoded(i), self.path(i)), int(self.labels[i])
