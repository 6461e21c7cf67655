"""The files of a trained denoiser folder (what `vigface-train-diffusion` exports, what
`vigface-gen` reads), and where its stage-1 model is.

    denoiser.safetensors   EMA weights
    denoiser.json          denoiser config, noise schedule, FR model folder + sha256, step, train config
    prototypes.safetensors copy of the FR model's real/virtual prototypes (the generation conditions)
    pose_landmarks.npy     up to 100k training landmark sets (the poses `--pose dataset` draws from)

`fr_model` in denoiser.json is an absolute path for trained runs and a path relative to the folder
for folders that travel (the model shipped inside the package keeps its FR model in `fr/`).
"""

from __future__ import annotations

import json
from pathlib import Path

from vigface.errors import DataFormatError

DENOISER_WEIGHTS = "denoiser.safetensors"
DENOISER_META = "denoiser.json"
PROTOTYPES = "prototypes.safetensors"
POSE_TABLE = "pose_landmarks.npy"
MAX_POSE_ROWS = 100_000


def read_denoiser_meta(model_dir: str | Path) -> dict:
    """denoiser.json of a trained denoiser folder, checked as far as its readers need it (the
    folder's files, a JSON object, `fr_model` a path); DataFormatError naming what is wrong."""
    model_dir = Path(model_dir)
    meta_path = model_dir / DENOISER_META
    if not meta_path.is_file() or not (model_dir / DENOISER_WEIGHTS).is_file():
        raise DataFormatError(
            model_dir, f"not a trained denoiser folder (needs {DENOISER_META} and {DENOISER_WEIGHTS})"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataFormatError(meta_path, f"not readable JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("fr_model", ""), str):
        raise DataFormatError(meta_path, "not a denoiser description (an object whose fr_model is a path)")
    return meta


def read_schedule(model_dir: str | Path, meta: dict):
    """The noise schedule denoiser.json names; DataFormatError if it names none."""
    from vigface.diffusion.schedule import NoiseSchedule

    try:
        return NoiseSchedule(meta["schedule"]["kind"], meta["schedule"]["num_steps"])
    except (KeyError, TypeError) as exc:
        meta_path = Path(model_dir) / DENOISER_META
        raise DataFormatError(meta_path, f"not a valid denoiser description ({exc})") from None


def fr_model_dir(model_dir: str | Path, meta: dict) -> Path:
    """The stage-1 model folder a denoiser was trained against (relative paths: inside model_dir)."""
    path = Path(meta.get("fr_model", ""))
    return path if path.is_absolute() else Path(model_dir) / path


def load_prototypes(path: str | Path) -> dict:
    """Unit-length real and virtual prototypes (float32 torch tensors) from a prototypes.safetensors."""
    import torch.nn.functional as F  # here, not at import: the file names above are read by light code
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        protos = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise DataFormatError(path, f"cannot be read as safetensors: {exc}") from None
    missing = [k for k in ("real", "virtual") if k not in protos or protos[k].ndim != 2]
    if missing:
        raise DataFormatError(path, f"has no 2-D {' / '.join(missing)} prototype table")
    return {k: F.normalize(protos[k].float(), dim=1) for k in ("real", "virtual")}


def prototypes_backbone_sha256(path: str | Path) -> str | None:
    """The sha256 of the backbone whose feature space a prototypes file holds (recorded by the FR
    trainer since prototypes carry it), or None for older files and unreadable ones."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            return (f.metadata() or {}).get("backbone_sha256")
    except (SafetensorError, OSError):
        return None
