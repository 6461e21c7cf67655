"""`vigface data merge`: several labelled face datasets as one training set (train.rec).

The paper's second use of VIGFace (§5.3, Table 3) trains an FR model on real images *and*
generated ones. The trainers read one dataset, so this writes one: every input's images, copied
as encoded (no re-encoding), with labels made disjoint — input k's label l becomes l plus the class
count of the inputs before it. A vigface-gen set of *real* identities shows people the real data
already holds (prototype p is class p of the data stage 1 was trained on), so for such an input
the caller must choose: `real_ids="join"` labels those images as that class of the first
non-generated input, `"separate"` gives them classes of their own.

    out/train.rec, train.idx   images grouped by label (identity ranges in record 0)
    out/train_landmarks.npy    the inputs' landmarks in record order, when every input has them
    out/merge.json             the inputs, their label mapping and the counts (written last)
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vigface.data.files import write_atomically
from vigface.data.images import decode_image, sniff_image_format
from vigface.data.loaders.source import FaceSource
from vigface.data.output_folder import refuse_foreign_output, remove_stale_temporaries
from vigface.data.recordio import FaceRecordDataset, FaceRecordWriter
from vigface.errors import VigfaceError
from vigface.eval.labelled_set import generation_kinds
from vigface.run_lock import FolderLock

MERGE_FILES = ("train.rec", "train.idx", "train_landmarks.npy", "merge.json")
REAL_ID_CHOICES = ("join", "separate")


@dataclass
class _Input:
    path: Path
    source: FaceSource  # the loaders' reader: labels, encoded bytes, the landmarks table if any
    kinds: dict[int, tuple[str, int]] | None  # vigface-gen's label -> (kind, prototype index)

    @property
    def labels(self) -> np.ndarray:
        return self.source.labels

    def image_shape(self) -> tuple[int, ...]:
        return decode_image(self.source.encoded(0), self.path).shape

    def real_labels(self) -> np.ndarray:
        """The labels vigface-gen gave to real identities (empty for other inputs)."""
        if self.kinds is None:
            return np.zeros(0, dtype=np.int64)
        return np.asarray(sorted(k for k, (kind, _) in self.kinds.items() if kind == "real"), dtype=np.int64)


def _open(path: Path) -> _Input:
    source = FaceSource(path)  # refuses a dataset without images
    kinds = generation_kinds(path)
    if kinds is not None:
        unknown = sorted(set(np.unique(source.labels).tolist()) - set(kinds))
        if unknown:
            raise VigfaceError(
                f"{path}: label {unknown[0]} is not in its generation.json ({len(unknown)} such labels)"
            )
    return _Input(path, source, kinds)


def _check_output(out: Path, inputs: list[Path], overwrite: bool) -> None:
    if out.suffix == ".rec" or out.is_file():
        raise VigfaceError(f"--out {out}: must be a folder (it receives train.rec, train.idx, merge.json)")
    resolved = out.resolve()
    for path in inputs:
        if not path.exists():  # (it was reported as an --out inside the missing input's parent)
            raise VigfaceError(
                f"{path}: no such dataset (a train.rec, a folder holding one, or an image folder)"
            )
        folder = (path if path.is_dir() else path.parent).resolve()
        if folder == resolved:
            raise VigfaceError(f"--out {out}: is also an input; write the merged set to another folder")
        image_folder = path.is_dir() and not (path / "train.rec").is_file()
        if image_folder and (folder in resolved.parents or resolved in folder.parents):
            # inside an image folder it would become an identity folder of that input (beside a
            # .rec, or around one, it harms nothing)
            raise VigfaceError(
                f"--out {out}: lies inside (or around) the input {path}; choose another folder"
            )
    refuse_foreign_output(out, own=MERGE_FILES, what="vigface data merge")
    if (out / "train.rec").exists() and not overwrite:
        raise VigfaceError(f"{out / 'train.rec'}: already exists; pass --overwrite to replace it")


def _new_labels(inputs: list[_Input], real_ids: str | None) -> tuple[list[np.ndarray], list[dict]]:
    """Each input's labels in the merged set, and a description of each mapping for merge.json."""
    with_real = [x for x in inputs if len(x.real_labels())]
    if with_real and real_ids is None:
        raise VigfaceError(
            f"{with_real[0].path}: holds generated images of real identities (kind 'real' in its "
            "generation.json), people the real data may hold too; pass --real-ids join to label them as "
            "the classes of the first input that is not a generated set (prototype p = class p of the "
            "data stage 1 was trained on), or --real-ids separate to give them classes of their own"
        )
    if real_ids is not None and real_ids not in REAL_ID_CHOICES:
        raise VigfaceError(f"--real-ids {real_ids!r}: expected one of {', '.join(REAL_ID_CHOICES)}")
    anchor = next((k for k, x in enumerate(inputs) if x.kinds is None), None)
    if with_real and real_ids == "join" and anchor is None:
        raise VigfaceError(
            "--real-ids join: every input is a generated set, so no input holds the real classes to join; "
            "add the real training set as an input, or pass --real-ids separate"
        )
    # An input whose real ids are joined keeps only its other (virtual) identities, on consecutive
    # labels in their order; any other input's label l becomes l + offset.
    joins, own, offsets, total = [], [], [], 0
    for x in inputs:
        join = bool(len(x.real_labels())) and real_ids == "join"
        kept = np.unique(x.labels[~np.isin(x.labels, x.real_labels())]) if join else None
        joins.append(join)
        own.append(kept)
        offsets.append(total)
        total += len(kept) if join else int(x.labels.max()) + 1
    mapped, described = [], []
    for k, x in enumerate(inputs):
        entry = {"path": str(x.path.resolve()), "images": int(len(x.labels)), "label_offset": offsets[k]}
        new = x.labels + offsets[k]
        if joins[k]:
            classes = int(inputs[anchor].labels.max()) + 1
            joined = np.isin(x.labels, x.real_labels())
            protos = np.asarray([x.kinds[int(label)][1] for label in x.labels[joined]], dtype=np.int64)
            if len(protos) and protos.max() >= classes:
                raise VigfaceError(
                    f"--real-ids join: {x.path} has images of real prototype {int(protos.max())}, but "
                    f"{inputs[anchor].path} has only {classes} classes (is it the data stage 1 used?)"
                )
            new[joined] = protos + offsets[anchor]
            new[~joined] = offsets[k] + np.searchsorted(own[k], x.labels[~joined])
            entry.update(
                real_ids_joined_with=str(inputs[anchor].path.resolve()), images_joined=int(joined.sum())
            )
        mapped.append(new)
        described.append(entry)
    return mapped, described


def _write(out: Path, sources, labels, which, rows, order, tables, progress: bool) -> None:
    """train.rec (+ train_landmarks.npy when `tables`) in `order`; merge.json is the caller's."""
    manifest = out / "merge.json"
    replaced = manifest.read_bytes() if manifest.is_file() else None
    manifest.unlink(missing_ok=True)  # a replaced merge is unfinished until the new one lands
    remove_stale_temporaries(out, own=MERGE_FILES)
    try:
        with FaceRecordWriter(out) as writer:
            for n in tqdm(order, desc="merge", unit="img", disable=not progress):
                source, row = sources[which[n]], int(rows[n])
                payload = source.source.encoded(row)
                if sniff_image_format(payload) is None:  # the writer named its own output's key
                    raise VigfaceError(
                        f"{source.path}: {source.source.describe(row)} is not an encoded image (starts "
                        f"with {payload[:8].hex() or 'nothing'}); merge copies images as they are"
                    )
                writer.add(payload, int(labels[n]))
    except BaseException:
        if replaced is not None:  # the writer kept the old train.rec: its merge.json describes it again
            write_atomically(manifest, replaced)
        raise
    if tables is not None:
        buffer = io.BytesIO()
        np.save(buffer, np.concatenate(tables)[order].astype(np.float32))
        write_atomically(out / "train_landmarks.npy", buffer.getvalue())
    else:
        (out / "train_landmarks.npy").unlink(missing_ok=True)


def merge_datasets(
    inputs: list[str | os.PathLike],
    out: str | os.PathLike,
    *,
    real_ids: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write the inputs as one train.rec in `out`; returns what merge.json records.

    Checked before the first image is written: the paths, each input's image size (from its first
    image: a dataset mixing sizes inside is not read whole here), its landmark table and the label
    mapping. The .rec appears by atomic rename, and merge.json last, so a folder holding merge.json
    holds a finished merge. Landmark rows an input lacks (NaN in a manifest) stay NaN, as the loaders
    expect (they skip such images when aligning on the fly); merge.json counts them."""
    paths = [Path(p) for p in inputs]
    out = Path(out)
    if len(paths) < 2:
        raise VigfaceError(f"merge: give at least two datasets to merge, got {len(paths)}")
    seen: dict[Path, Path] = {}
    for path in paths:
        key = (path / "train.rec" if (path / "train.rec").is_file() else path).resolve()
        if key in seen:
            raise VigfaceError(f"{path}: listed twice (also as {seen[key]}); each input is merged once")
        seen[key] = path
    _check_output(out, paths, overwrite)
    sources = [_open(path) for path in paths]
    shapes = [x.image_shape() for x in sources]
    for x, shape in zip(sources[1:], shapes[1:], strict=True):
        if shape != shapes[0]:
            raise VigfaceError(
                f"{x.path}: images are {shape[1]}x{shape[0]}, but {sources[0].path}'s are "
                f"{shapes[0][1]}x{shapes[0][0]}; align or generate them at one size first"
            )
    tables = [x.source.landmarks_if_any() for x in sources]
    keep_landmarks = all(t is not None for t in tables)
    mapped, described = _new_labels(sources, real_ids)

    # The .rec stores each identity as one key range, so write all images of a label together
    # (joined real ids gather images from two inputs): one stable sort over (label, input, row).
    labels = np.concatenate(mapped)
    which = np.concatenate([np.full(len(m), k) for k, m in enumerate(mapped)])
    rows = np.concatenate([np.arange(len(m)) for m in mapped])
    order = np.argsort(labels, kind="stable")
    summary = {
        "inputs": described,
        "images": int(len(labels)),
        "identities": int(len(np.unique(labels))),
        "num_classes": int(labels.max()) + 1,
        "real_ids": real_ids if any(len(x.real_labels()) for x in sources) else None,
        "landmarks": keep_landmarks,
    }
    if keep_landmarks:
        rows_ok = np.isfinite(np.concatenate(tables)).all(axis=(1, 2))
        summary["landmark_rows_missing"] = int((~rows_ok).sum())
    else:
        summary["landmarks_missing_in"] = [
            str(x.path) for x, t in zip(sources, tables, strict=True) if t is None
        ]
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with FolderLock(out) as lock:  # a second merge into this folder is refused, naming this pid
            lock.acquire()
            _write(out, sources, labels, which, rows, order, tables if keep_landmarks else None, progress)
            write_atomically(out / "merge.json", json.dumps(summary, indent=2) + "\n")  # last: finished
    except BaseException:
        if created:  # an interrupted or failed merge leaves no empty folder behind
            try:
                out.rmdir()
            except OSError:
                pass
        raise
    for x in sources:
        if isinstance(x.source.dataset, FaceRecordDataset):
            x.source.dataset.close()
    return summary
