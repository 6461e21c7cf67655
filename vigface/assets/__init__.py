"""Files shipped inside the package.

`tiny_model/`: a toy-world FR + diffusion pair (IResNet-18 at 32 px with 100 real and 100 virtual
prototypes; a tiny U-ViT at 32 px), small enough to ship, so `vigface-gen --out DIR` and
`vigface demo --quick` work right after install. Made by `scripts/make_tiny_model.py`.
"""

from __future__ import annotations

from pathlib import Path

from vigface.errors import VigfaceError


def tiny_model_dir() -> Path:
    """The shipped denoiser folder (its FR model is in `fr/` inside it)."""
    path = Path(__file__).resolve().parent / "tiny_model"
    if not (path / "denoiser.json").is_file():
        raise VigfaceError(
            f"the shipped tiny model is missing from {path}; reinstall vigface, or make it with "
            "`python scripts/make_tiny_model.py --install`"
        )
    return path
