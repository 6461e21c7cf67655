"""`vigface data info PATH`: a short summary of a .rec, .bin, image folder, toy or generated dataset."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from vigface.data.image_folder import MANIFEST, ImageFolderDataset
from vigface.data.images import sniff_image_format
from vigface.data.landmarks_npy import read_landmarks_npy
from vigface.data.recordio import FaceRecordDataset
from vigface.data.verification_bin import read_bin
from vigface.errors import DataFormatError, VigfaceError


def _image_summary(ds, n: int) -> dict:
    """Format and size of the first image, decoded (cheap; the rest is not read: --check-images)."""
    if n == 0:
        return {}
    # a summary names a bad first image rather than failing on it
    try:
        payload = ds.encoded(0)[0] if isinstance(ds, FaceRecordDataset) else ds.encoded(0)
    except DataFormatError as err:
        return {"first_image": f"unreadable ({err})"}
    fmt = sniff_image_format(payload)
    try:
        return {"image_format": fmt, "image_shape": list(ds[0][0].shape)}
    except DataFormatError as err:
        return {"image_format": fmt, "first_image": f"does not decode ({err})"}


def describe_rec(path: Path) -> dict:
    ds = FaceRecordDataset(path)
    labels = np.asarray(ds.labels)
    counts = np.bincount(labels) if len(labels) else np.zeros(0, int)
    counts = counts[counts > 0]
    info = {
        "kind": "recordio",
        "path": str(path),
        "bytes": path.stat().st_size,
        "images": len(ds),
        "identities": int(len(counts)),
        "num_classes": int(ds.num_classes),
        # header record 0 present (its identity records may still be missing from the .idx: the
        # dataset then warns and reads labels record by record)
        "identity_header": ds.identity_keys is not None,
        "images_per_identity": f"min {counts.min()} / mean {counts.mean():.1f} / max {counts.max()}"
        if len(counts)
        else "-",
        **_image_summary(ds, len(ds)),
    }
    landmarks = path.with_name(path.stem + "_landmarks.npy")
    if landmarks.exists():  # a summary reports a bad table rather than failing on it
        try:
            lm = read_landmarks_npy(landmarks, len(ds), f"the {len(ds)} images", mmap=True)
            info["landmarks"] = f"{landmarks.name} {tuple(lm.shape)} {lm.dtype}"
        except DataFormatError as err:
            info["landmarks"] = f"unusable: {err}"
    ds.close()
    return info


def describe_bin(path: Path) -> dict:
    images, issame = read_bin(path)
    info = {
        "kind": "verification-bin",
        "path": str(path),
        "bytes": path.stat().st_size,
        "pairs": len(issame),
        "positives": int(np.sum(issame)),
        "images": len(images),
    }
    if images:
        info["image_format"] = sniff_image_format(bytes(images[0]))
    return info


def describe_folder(path: Path) -> dict:
    ds = ImageFolderDataset(path)
    return {
        "kind": "image-folder",
        "path": str(path),
        "manifest": (path / MANIFEST).exists(),
        "images": len(ds),
        "identities": len(set(ds.labels.tolist())),
        "num_classes": int(ds.num_classes),
        "landmarks": ds.landmarks is not None,
        **_image_summary(ds, len(ds)),
    }


def describe_generated(path: Path) -> dict:
    """A vigface-gen output folder: its plan, the identities by kind, and the data once merged."""
    meta_path = path / "generation.json"
    try:
        meta = json.loads(meta_path.read_text())
        plan, labels = meta["plan"], meta["labels"]
        config = plan["config"]
        kinds = [str(kind) for kind, _ in labels.values()]
        if not isinstance(plan, dict) or not isinstance(config, dict):
            raise TypeError("plan and plan.config must be JSON objects")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DataFormatError(meta_path, f"not a generation description ({exc})") from None
    info = {
        "kind": "generated-dataset",
        "path": str(path),
        "model": config.get("model"),
        "sampler": f"{config.get('sampler')}, {config.get('steps')} steps",
        "w_real": config.get("w_real"),
        "w_virtual": config.get("w_virtual"),
        "real_ids": kinds.count("real"),
        "virtual_ids": kinds.count("virtual"),
        "planned_images": plan.get("images"),
    }
    if config.get("format") == "folder" and (path / MANIFEST).is_file():
        info["data"] = describe_folder(path)
    elif config.get("format", "rec") == "rec" and (path / "train.rec").is_file():
        info["data"] = describe_rec(path / "train.rec")
    else:
        done = len(list(path.glob("shards/shard_*/meta.json")))
        info["data"] = (
            f"not finished ({done} of {plan.get('shards')} shards made); "
            "run the same vigface-gen command again to finish it"
        )
    return info


def _merge_inputs(path: Path) -> list[str] | str:
    """One line per input of a `vigface data merge` output: its path, images and label offset."""
    try:
        inputs = json.loads(path.read_text())["inputs"]
        return [
            f"{x['path']} ({x['images']} images, labels from {x['label_offset']}"
            + (f"; {x['images_joined']} joined to real classes)" if "images_joined" in x else ")")
            for x in inputs
        ]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        return f"unreadable {path.name} ({exc!r})"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataFormatError(path, f"not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataFormatError(path, "not a JSON object")
    return data


def _object(meta: dict, key: str) -> dict:
    """meta[key] where it is a JSON object, else {} (a summary shows '?' rather than failing)."""
    value = meta.get(key)
    return value if isinstance(value, dict) else {}


def describe_model(path: Path) -> dict:
    """A trained model or run folder: what the trainers write (backbone / denoiser / checkpoints)."""
    info: dict = {"path": str(path)}
    if (path / "backbone.json").is_file():
        meta = _read_json(path / "backbone.json")
        backbone, margin = _object(meta, "backbone"), _object(meta, "margin")
        info.update(
            kind="fr-model",
            backbone=f"{backbone.get('arch')} width {backbone.get('width')}, "
            f"{backbone.get('input_size')} px, {backbone.get('embedding_dim')}-d",
            margin=f"{margin.get('kind')} (s {margin.get('scale')}, m {margin.get('margin')})",
            prototypes=f"{meta.get('num_real')} real + {meta.get('num_virtual')} virtual",
            step=meta.get("step"),
            data=_object(meta, "train_config").get("data"),
        )
    elif (path / "denoiser.json").is_file():
        meta = _read_json(path / "denoiser.json")
        den = _object(meta, "denoiser")
        info.update(
            kind="denoiser",
            denoiser=f"{den.get('arch')} {den.get('image_size')} px, patch {den.get('patch')}, width "
            f"{den.get('width')}, depth {den.get('depth')}",
            step=meta.get("step"),
            fr_model=meta.get("fr_model"),
            data=_object(meta, "train_config").get("data"),
        )
    else:
        info["kind"] = "training run (not exported yet)"
    checkpoints = (
        sorted(p.name for p in (path / "checkpoints").glob("step_*"))
        if (path / "checkpoints").is_dir()
        else []
    )
    if checkpoints:
        info["checkpoints"] = f"{len(checkpoints)}, latest {checkpoints[-1]}"
    return info


def toy_recipe(folder: Path) -> tuple[dict, list[str]]:
    """A toy world's toy.json and the files it lists; DataFormatError for a damaged one."""
    recipe = _read_json(folder / "toy.json")
    files = recipe.get("files", [])
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        raise DataFormatError(folder / "toy.json", f"'files' must be a list of file names, got {files!r}")
    return recipe, files


def describe(path: str | os.PathLike) -> dict:
    """Summary of `path` as a flat dict; raises VigfaceError for what it cannot read."""
    if not str(path):  # Path("") is the current folder
        raise VigfaceError("data info: the path is empty")
    path = Path(path)
    if not path.exists():
        raise VigfaceError(f"{path}: no such file or folder")
    if path.is_dir() and (path / "toy.json").exists():
        recipe, files = toy_recipe(path)
        info = {
            "kind": "toy-dataset",
            "path": str(path),
            "config": recipe.get("config"),
            "made_in_seconds": recipe.get("total_seconds"),
        }
        for name in files:
            if name.endswith(".rec"):
                info[name] = describe_rec(path / name)
            elif name.endswith(".bin"):
                info[name] = describe_bin(path / name)
        return info
    if path.is_dir() and (path / "generation.json").is_file():
        return describe_generated(path)
    exported = any((path / name).is_file() for name in ("backbone.json", "denoiser.json"))
    a_run = (path / "config.json").is_file() and (path / "metrics.jsonl").is_file()  # maybe no checkpoint yet
    if path.is_dir() and (exported or a_run):
        return describe_model(path)
    if path.is_dir() and (path / "train.rec").is_file() and not (path / MANIFEST).exists():
        info = describe_rec(path / "train.rec")  # a folder holding train.rec, as the trainers take it
        if (path / "merge.json").is_file():
            info["merged_from"] = _merge_inputs(path / "merge.json")
        return info
    if path.is_dir():
        return describe_folder(path)
    if path.suffix == ".rec":
        return describe_rec(path)
    if path.suffix == ".bin":
        return describe_bin(path)
    raise VigfaceError(f"{path}: not a .rec, .bin or folder; don't know how to describe it")
