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

from pathlib import Path

DENOISER_WEIGHTS = "denoiser.safetensors"
DENOISER_META = "denoiser.json"
PROTOTYPES = "prototypes.safetensors"
POSE_TABLE = "pose_landmarks.npy"
MAX_POSE_ROWS = 100_000


def fr_model_dir(model_dir: str | Path, meta: dict) -> Path:
    """The stage-1 model folder a denoiser was trained against (relative paths: inside model_dir)."""
    path = Path(meta.get("fr_model", ""))
    return path if path.is_absolute() else Path(model_dir) / path
