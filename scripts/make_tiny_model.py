"""Train the tiny toy-world model pair that ships inside the package, and install it.

    python scripts/make_tiny_model.py --work runs/tiny_model            # ~1.5 h on 2 CPU cores
    python scripts/make_tiny_model.py --work runs/tiny_model --install  # copy into vigface/assets

Three stages, each skipped when its output exists and resumed when it was interrupted:
  1. toy world: 100 identities x 30 aligned images (`vigface data toy --ids 100 --per-id 30`)
  2. stage 1: IResNet-18 (width 16) at 32 px, 128-d, CosFace s = 30, 100 virtual prototypes, 20 epochs
  3. stage 2: tiny U-ViT at 32 px (patch 4, 64 tokens) on eq. 8, 8,000 steps of 32 images
`--install` writes vigface/assets/tiny_model/: the denoiser's EMA weights in fp16 (half the size;
sampling runs in fp32 either way), its prototypes and pose table, and the FR model (fp32, so its
sha256 still matches the one the denoiser records) under fr/. `fr_model` becomes the relative
path "fr", so the folder works wherever the package is installed.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from vigface.data.output_folder import refuse_foreign_output
from vigface.data.toy_dataset import ToyConfig, make_toy_dataset
from vigface.diffusion.config import DiffusionTrainConfig
from vigface.diffusion.model_folder import DENOISER_META, DENOISER_WEIGHTS, POSE_TABLE, PROTOTYPES
from vigface.diffusion.trainer import train_diffusion
from vigface.errors import VigfaceError
from vigface.fr.checkpoint import latest_checkpoint
from vigface.fr.config import FRTrainConfig
from vigface.fr.embed import BACKBONE_META, BACKBONE_WEIGHTS
from vigface.fr.trainer import train_fr

TOY = ToyConfig(ids=100, per_id=30, seed=0, pairs=1200, val_ids=100)


def fr_config(work: Path) -> FRTrainConfig:
    toy = work / "toy"
    return FRTrainConfig(
        data=str(toy / "train.rec"), out=str(work / "fr"), arch="iresnet18", width=16, input_size=32,
        embedding_dim=128, margin="cosface", scale=30.0, num_virtual=100, batch_size=64, epochs=20,
        lr=0.1, lr_steps=[14, 18], warmup_epochs=1.0, workers=1, save_every=200, log_every=20,
        val=[str(toy / "toy_val.bin")], val_every=10,
    )  # fmt: skip


def diffusion_config(work: Path) -> DiffusionTrainConfig:
    return DiffusionTrainConfig(
        data=str(work / "toy" / "train.rec"), fr_model=str(work / "fr"), out=str(work / "diffusion"),
        size="tiny", image_size=32, patch=4, batch_size=32, steps=8000, lr=3e-4, warmup_steps=200,
        workers=1, save_every=500, log_every=100,
    )  # fmt: skip


def train(work: Path) -> None:
    if not (work / "toy" / "toy.json").is_file():
        make_toy_dataset(work / "toy", TOY, overwrite=True)
    if not (work / "fr" / "backbone.safetensors").is_file():
        train_fr(fr_config(work), resume=latest_checkpoint(work / "fr") is not None)
    if not (work / "diffusion" / DENOISER_WEIGHTS).is_file():
        train_diffusion(diffusion_config(work), resume=latest_checkpoint(work / "diffusion") is not None)


# What an installed model folder holds: --dest may hold these alone (it is replaced as a whole).
INSTALLED = (DENOISER_WEIGHTS, DENOISER_META, PROTOTYPES, POSE_TABLE, "fr")
FR_FILES = (BACKBONE_WEIGHTS, BACKBONE_META, PROTOTYPES)


def check_dest(dest: Path) -> None:
    """Refuse a --dest holding anything but an installed model: it was deleted whatever it held."""
    if dest.exists() and not dest.is_dir():
        raise SystemExit(f"make_tiny_model: --dest {dest} is a file; give a folder")
    refuse_foreign_output(dest, own=INSTALLED, what="make_tiny_model --install", flag="--dest")
    # install() deletes the folder as a whole: hidden entries and fr/'s files count too
    refuse_foreign_output(dest / "fr", own=FR_FILES, what="make_tiny_model --install", flag="--dest")
    for folder in (dest, dest / "fr"):
        hidden = sorted(p.name for p in folder.glob(".*")) if folder.is_dir() else []
        if hidden:
            raise VigfaceError(f"--dest {folder}: holds {', '.join(hidden)}; give an installed model")


def install(work: Path, dest: Path) -> None:
    """Copy the trained pair into `dest` (replaced as a whole, through a temporary folder)."""
    check_dest(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "fr").mkdir(parents=True)
    diffusion, fr = work / "diffusion", work / "fr"
    weights = {k: v.half() for k, v in load_file(diffusion / DENOISER_WEIGHTS).items()}
    save_file(weights, tmp / DENOISER_WEIGHTS)
    meta = json.loads((diffusion / DENOISER_META).read_text())
    meta["fr_model"] = "fr"
    meta["shipped"] = {"recipe": "scripts/make_tiny_model.py", "weights": "fp16 copy of the fp32 EMA weights"}
    (tmp / DENOISER_META).write_text(json.dumps(meta, indent=2) + "\n")
    for name in (PROTOTYPES, POSE_TABLE):
        shutil.copyfile(diffusion / name, tmp / name)
    for name in FR_FILES:
        shutil.copyfile(fr / name, tmp / "fr" / name)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"installed {dest} ({size / 2**20:.1f} MiB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/tiny_model", help="where the toy data and the two runs go")
    ap.add_argument("--install", action="store_true", help="copy the trained pair into the package")
    ap.add_argument("--dest", default=str(Path(__file__).resolve().parents[1] / "vigface/assets/tiny_model"))
    args = ap.parse_args()
    work = Path(args.work)
    if work.exists() and not work.is_dir():
        ap.error(f"--work {work}: is a file; give a folder")
    if args.install:  # before the ~1.5 h training, not after it
        try:
            check_dest(Path(args.dest))
        except VigfaceError as err:
            ap.error(str(err))
    elif args.dest != ap.get_default("dest"):
        ap.error("--dest goes with --install")
    train(work)
    if args.install:
        install(work, Path(args.dest))


if __name__ == "__main__":
    main()
