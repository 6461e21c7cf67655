"""`vigface data align`: align an image folder to the ArcFace template with 5-point landmarks.

The landmarks come from a `.jsonl` file ({"path": "<identity>/<n>.jpg", "landmarks": [[x, y]*5]}
per line), an `.npy` of shape (N, 5, 2) in the folder's manifest order, or the folder's own
manifest. The output is an image folder (aligned landmarks in its manifest) or a RecordIO
file with `<stem>_landmarks.npy` beside it (row i = record key i + 1), the layout the toy
world writes, and `<stem>_identities.json` ({label: identity folder name}). The C op is used
when built (bit-identical to the NumPy reference).
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vigface.data.align import align_faces, transform_points
from vigface.data.alignment_check import check_landmarks_fit
from vigface.data.files import write_atomically
from vigface.data.image_folder import MANIFEST, UNFINISHED, ImageFolderDataset, ImageFolderWriter
from vigface.data.landmarks_npy import read_landmarks_npy
from vigface.data.output_folder import refuse_foreign_output, remove_stale_temporaries
from vigface.data.recordio import FaceRecordWriter
from vigface.errors import DataFormatError, VigfaceError, VigfaceWarning


def _landmarks_from_jsonl(path: Path, ds: ImageFolderDataset) -> np.ndarray:
    by_path = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                points = np.asarray(row["landmarks"], dtype=np.float32)
                key = str(row["path"])
            except (ValueError, KeyError, TypeError) as err:
                raise DataFormatError(
                    path, f"line {line_no}: expected {{'path', 'landmarks'}} JSON ({err})"
                ) from None
            if points.shape != (5, 2):
                raise DataFormatError(
                    path, f"line {line_no}: landmarks must be 5 (x, y) points, got {points.shape}"
                )
            by_path[key] = points
    missing = [p for p in ds.paths if p not in by_path]
    if missing:
        raise DataFormatError(path, f"no landmarks for {len(missing)} images, e.g. {missing[0]!r}")
    return np.stack([by_path[p] for p in ds.paths])


def load_landmarks(ds: ImageFolderDataset, landmarks: str | os.PathLike | None) -> np.ndarray:
    """(N, 5, 2) float32 landmarks of every image of `ds`, in its order."""
    if landmarks is None:
        if ds.landmarks is None:
            raise VigfaceError(f"{ds.root}: {ds.why_no_landmarks()}; pass --landmarks FILE")
        return np.asarray(ds.landmarks, dtype=np.float32)
    path = Path(landmarks)
    if not path.exists():
        raise VigfaceError(f"--landmarks {path}: no such file")
    if path.suffix == ".jsonl":
        return _landmarks_from_jsonl(path, ds)
    if path.suffix == ".npy":
        return read_landmarks_npy(path, len(ds), f"the {len(ds)} images of {ds.root}")
    raise VigfaceError(f"--landmarks {path}: expected a .jsonl or .npy file")


MAX_SIZE = 2048  # aligned faces for FR are 112-256 px; this leaves room and bounds the memory
ALIGN_REC_FILES = ("train.rec", "train.idx", "train_landmarks.npy", "train_identities.json")


def _output_format(out: Path, out_format: str | None) -> str:
    if out_format is None:
        return "rec" if out.suffix == ".rec" else "folder"
    if out_format == "folder" and out.suffix == ".rec":
        raise VigfaceError(
            f"--out {out} with --format folder: an image folder named *.rec would pass for a RecordIO file; "
            "drop --format folder to write a .rec, or choose a folder name"
        )
    return out_format


def _check_not_the_input(images: Path, out: Path, out_format: str) -> None:
    """Refuse an --out that writes over the input: its .rec, or into its folder."""
    source = images / "train.rec" if images.is_dir() and (images / "train.rec").is_file() else images
    is_rec = source.suffix == ".rec"
    source_folder = (source.parent if is_rec else source).resolve()
    if out_format == "rec":
        rec = out if out.suffix == ".rec" else out / "train.rec"
        clash = rec.resolve() == source.resolve() or (not is_rec and rec.parent.resolve() == source_folder)
    else:
        clash = out.resolve() == source_folder
    if clash:
        raise VigfaceError(f"--out {out}: writes over the input {images}; write the aligned set elsewhere")


def _check_output(out: Path, out_format: str, overwrite: bool) -> None:
    if out_format == "rec":
        rec = out if out.suffix == ".rec" else out / "train.rec"
        if rec.is_dir():
            raise VigfaceError(f"--out {rec}: is a folder; a RecordIO file is written there")
        if rec.exists() and not overwrite:
            raise VigfaceError(f"{rec}: already exists; pass --overwrite to replace it")
        if rec.parent == out:  # --out is a folder: it receives train.rec and its companions only
            refuse_foreign_output(out, own=ALIGN_REC_FILES, what="align")
        remove_stale_temporaries(
            rec.parent,
            own=[
                rec.name,
                rec.with_suffix(".idx").name,
                f"{rec.stem}_landmarks.npy",
                f"{rec.stem}_identities.json",
            ],
        )
    elif out_format == "folder":
        if (out / MANIFEST).exists():
            if not overwrite:
                raise VigfaceError(f"{out / MANIFEST}: already exists; pass --overwrite to replace it")
        elif (out / UNFINISHED).is_file():
            pass  # a stopped run's output: the rerun writes it again, in full (a live writer is refused)
        elif out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()) and not overwrite:
            raise VigfaceError(
                f"{out}: not empty and holds no {MANIFEST} (not an aligned folder); choose an empty or new "
                "folder, or pass --overwrite to write into it"
            )


def _identity_names(path: Path) -> dict:
    """{label (str): identity name} from a `<stem>_identities.json`."""
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataFormatError(path, f"not readable JSON ({exc})") from None
    if not isinstance(names, dict):
        raise DataFormatError(path, "must be a JSON object {label: identity name}")
    return names


class _AlignInput:
    """What alignment reads: an image folder (landmarks from --landmarks or its manifest), or a .rec /
    a folder holding train.rec (landmarks from --landmarks or <stem>_landmarks.npy beside it, the
    layout `vigface data toy --unaligned` writes)."""

    def __init__(self, images: str | os.PathLike, landmarks: str | os.PathLike | None):
        path = Path(images)
        if path.suffix == ".rec" or (path.is_dir() and (path / "train.rec").is_file()):
            from vigface.data.loaders.source import FaceSource  # the loaders' reader, only for a .rec

            if landmarks is not None and not Path(landmarks).exists():
                raise VigfaceError(f"--landmarks {landmarks}: no such file")
            source = FaceSource(path, landmarks=landmarks, need_landmarks=True)
            self.dataset, self.where, self.encoded = source.dataset, source.describe, source.encoded
            self.points = source.landmarks
            names_path = source.path.with_name(f"{source.path.stem}_identities.json")
            names = _identity_names(names_path) if names_path.is_file() else {}
            self.identities = [str(names.get(str(label), f"{label:06d}")) for label in source.labels]
        else:
            ds = ImageFolderDataset(path)
            if len(ds) == 0:
                raise VigfaceError(f"{images}: no images found")
            self.dataset, self.where, self.encoded = ds, lambda i: str(ds.path(i)), ds.encoded
            self.points = load_landmarks(ds, landmarks)
            self.identities = ds.identities
        self.labels = np.asarray(self.dataset.labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.dataset[i]


def align_image_folder(
    images: str | os.PathLike,
    out: str | os.PathLike,
    *,
    landmarks: str | os.PathLike | None = None,
    out_format: str | None = None,
    size: int = 112,
    quality: int = 95,
    image_format: str = "jpeg",
    backend: str = "auto",
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Align every image of `images` (an image folder or a .rec, see _AlignInput) into `out`; returns
    {"images", "identities"}.

    An existing aligned output (a manifest, or the .rec) is replaced only with `overwrite`; a folder
    holding anything else is refused either way (checked before any image is read). `out_format`
    None: "rec" for an --out ending in .rec, else "folder"."""
    if not 1 <= quality <= 100:  # PIL took 0 and 101 without a word
        raise VigfaceError(f"--quality must be in 1..100, got {quality}")
    if not 16 <= size <= MAX_SIZE:  # 100,000 px asked NumPy for 28 GiB per image
        raise VigfaceError(f"--size must be in 16..{MAX_SIZE} pixels, got {size}")
    out_format = _output_format(Path(out), out_format)
    _check_not_the_input(Path(images), Path(out), out_format)
    _check_output(Path(out), out_format, overwrite)
    ds = _AlignInput(images, landmarks)
    points = ds.points
    named = f"--landmarks {landmarks}" if landmarks else f"the landmarks of {images}"
    check_landmarks_fit(points, ds.encoded, named)
    missing = np.flatnonzero(~np.isfinite(np.asarray(points, dtype=np.float64)).all(axis=(1, 2)))
    if missing.size:  # up front: the run stopped at the first such row, after writing the ones before
        shown = ", ".join(ds.where(int(i)) for i in missing[:3])
        raise VigfaceError(
            f"{named}: {missing.size} of {len(points)} rows hold NaN or infinite coordinates ({shown}"
            f"{', ...' if missing.size > 3 else ''}): their faces cannot be placed; drop those images "
            "or give their landmarks"
        )
    # RecordIO wants each identity's images contiguous: a stable sort by label keeps file order.
    order = np.argsort(ds.labels, kind="stable") if out_format == "rec" else np.arange(len(ds))
    out = Path(out)
    if out_format == "rec":
        writer = FaceRecordWriter(out, fmt=image_format, quality=quality)
        aligned_points = np.empty((len(ds), 5, 2), dtype=np.float32)
    elif out_format == "folder":
        writer = ImageFolderWriter(out, fmt=image_format, quality=quality, overwrite=overwrite)
    else:
        raise VigfaceError(f"--format {out_format!r}: expected 'folder' or 'rec'")
    skipped = []  # images that do not decode: skipped and named, as the loaders skip them
    n, labels_written = 0, set()
    with writer:
        for i in tqdm(order, desc="align", unit="img", disable=not progress):
            try:
                img, label = ds[int(i)]
            except DataFormatError as err:
                skipped.append(str(err))
                continue
            try:
                aligned, matrix = align_faces(img, points[i], out_size=size, backend=backend)
            except VigfaceError as err:
                raise VigfaceError(f"{ds.where(int(i))}: {err}") from None
            moved = transform_points(points[i], matrix)
            if out_format == "rec":
                writer.add(aligned, label)
                aligned_points[n] = moved
            else:
                writer.add(aligned, label, identity=ds.identities[i], landmarks=moved)
            n += 1
            labels_written.add(int(label))
        if n == 0:  # (inside the writer: it leaves nothing behind)
            raise VigfaceError(f"{images}: none of its {len(ds)} images decodes (first: {skipped[0]})")
    if skipped:
        warnings.warn(
            VigfaceWarning(
                f"{images}: skipped {len(skipped)} image(s) that do not decode (first: {skipped[0]})"
            ),
            stacklevel=2,
        )
    if out_format == "rec":
        rec = out / "train.rec" if out.is_dir() else out
        buffer = io.BytesIO()
        np.save(buffer, aligned_points[:n])
        write_atomically(rec.with_name(rec.stem + "_landmarks.npy"), buffer.getvalue())
        # A .rec keeps labels only: the identity (folder) name of each label goes beside it.
        names = dict(zip(ds.labels.tolist(), ds.identities, strict=True))
        write_atomically(rec.with_name(rec.stem + "_identities.json"), json.dumps(names, indent=0) + "\n")
    return {"images": n, "skipped": len(skipped), "identities": len(labels_written)}
