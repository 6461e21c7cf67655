"""Embeddings from a trained backbone: load backbone.safetensors + backbone.json, embed images.

The verification protocol of insightface sums the embeddings of an image and its mirror image
before normalising (`flip=True`); both the trainer's per-epoch evaluation and `vigface-embed`
use this function.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from vigface.device import resolve_device
from vigface.errors import DataFormatError, VigfaceError
from vigface.fr.backbone_config import BackboneConfig
from vigface.fr.iresnet import IResNet, build_backbone

BACKBONE_WEIGHTS = "backbone.safetensors"
BACKBONE_META = "backbone.json"


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_backbone_folder(model_dir: str | os.PathLike) -> None:
    """Refuse a folder without a stage-1 model's two files (before any long work that ends in it)."""
    model_dir = Path(model_dir)
    if not (model_dir / BACKBONE_META).is_file() or not (model_dir / BACKBONE_WEIGHTS).is_file():
        raise DataFormatError(
            model_dir, f"not a trained backbone folder (needs {BACKBONE_META} and {BACKBONE_WEIGHTS})"
        )


def load_backbone(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[IResNet, dict]:
    """(backbone in eval mode on `device`, its backbone.json) from a stage-1 output folder."""
    check_backbone_folder(model_dir)
    model_dir = Path(model_dir)
    meta_path, weights_path = model_dir / BACKBONE_META, model_dir / BACKBONE_WEIGHTS
    try:
        meta = json.loads(meta_path.read_text())
        config = BackboneConfig(**meta["backbone"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataFormatError(meta_path, f"not a valid backbone description ({exc})") from None
    model = build_backbone(config)
    try:
        state = load_file(weights_path)
    except Exception as exc:  # safetensors' own error type
        raise DataFormatError(weights_path, f"cannot be read: {exc}") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that disagree with backbone.json (strict=False still raises)
        first = str(exc).split("size mismatch for ", 1)[-1].splitlines()[0]
        raise DataFormatError(
            weights_path, f"does not match the backbone {meta_path.name} describes ({first})"
        ) from None
    if missing or unexpected:
        raise DataFormatError(
            weights_path,
            f"does not match {config.arch} (missing {missing[:3]}..., unexpected {unexpected[:3]}...)",
        )
    return model.to(resolve_device(device)).eval(), meta


def to_input(images_u8: torch.Tensor, input_size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, S, S) in [-1, 1] (mean = std = 0.5)."""
    x = images_u8.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    if x.shape[-1] != input_size or x.shape[-2] != input_size:
        x = F.interpolate(x, size=(input_size, input_size), mode="area")
    return x


@torch.no_grad()
def embed_images(
    model: torch.nn.Module,
    images,
    *,
    batch_size: int = 256,
    flip: bool = True,
    device: str | torch.device | None = None,
    normalize: bool = True,
    progress=None,
) -> np.ndarray:
    """float32 (N, dim) embeddings of uint8 (N, H, W, 3) images (an array or an iterable of arrays).

    `progress`: an optional callable taking the number of images done in each batch (e.g. tqdm.update).
    """
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    was_training = model.training
    model.eval()
    input_size = model.config.input_size if hasattr(model, "config") else 112
    out = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    try:
        for chunk in _batches(images, batch_size):
            x = to_input(torch.as_tensor(chunk).to(device), input_size)
            with autocast:
                e = model(x).float()
                if flip:
                    e = e + model(x.flip(-1)).float()
            out.append((F.normalize(e, dim=1) if normalize else e).cpu())
            if progress is not None:
                progress(len(chunk))
    finally:
        model.train(was_training)
    if not out:
        return np.zeros((0, getattr(getattr(model, "config", None), "embedding_dim", 0)), dtype=np.float32)
    return torch.cat(out).numpy().astype(np.float32)


def _batches(images, batch_size: int):
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise VigfaceError(f"embed: batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(images, np.ndarray):
        _check_batch(images)
        for lo in range(0, len(images), batch_size):
            yield images[lo : lo + batch_size]
        return
    pending = []
    for image in images:
        pending.append(np.asarray(image))
        if len(pending) == batch_size:
            yield _stack(pending)
            pending = []
    if pending:
        yield _stack(pending)


def _stack(images: list) -> np.ndarray:
    shape = images[0].shape
    for image in images:
        if image.shape != shape or image.dtype != np.uint8:
            raise VigfaceError(
                f"embed: images must be uint8 arrays of one shape, got {image.shape} {image.dtype} and "
                f"{shape}; align them to one size first (vigface data align)"
            )
    return _check_batch(np.stack(images))


def _check_batch(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) RGB, or a clear error: a float array in [0, 1] was embedded as a nearly black
    image, and CHW or grayscale arrays failed inside the network."""
    if len(images) and (images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3):
        raise VigfaceError(
            f"embed: images must be uint8 (N, H, W, 3) RGB arrays (0-255), got {images.dtype} "
            f"{tuple(images.shape)}"
        )
    return images
