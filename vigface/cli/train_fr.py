"""`vigface-train-fr`: stage-1 FR training with virtual prototypes (one process or torchrun).

    vigface-train-fr --data toy/train.rec --out runs/fr --num-virtual 1000 --val toy/toy_val.bin
    torchrun --nproc_per_node 8 -m vigface.cli.train_fr --data ms1m/train.rec --out runs/fr ...
    vigface-train-fr --out runs/fr --resume          # continue a killed run from its last checkpoint

Every flag is a field of `FRTrainConfig` (vigface/fr/config.py); --resume reads the run's own
config.json and accepts only flags that do not change the computation (epochs, workers, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from vigface.cli.common import run_command
from vigface.errors import VigfaceError
from vigface.fr.config import AMP_MODES, OPTIMIZERS, FRTrainConfig
from vigface.fr.iresnet import ARCHS
from vigface.fr.margins import MARGINS

HELP = {
    "data": "train.rec, a folder holding train.rec, or an image folder root/<id>/<n>.jpg",
    "out": "output folder (checkpoints, metrics.jsonl, backbone, prototypes, report)",
    "arch": "backbone",
    "width": "channels of the first stage (64 = paper; 16 for CPU-sized models)",
    "input_size": "input resolution; 112x112 images are area-resized (56 for CPU runs)",
    "margin": "margin softmax",
    "scale": "logit scale s (paper: 64 on MS1M-V2, 30 on CASIA-WebFace)",
    "margin_m": "margin m (default 0.5 arcface, 0.35 cosface, 0.4 adaface)",
    "num_virtual": "k virtual prototypes W_V beside the real ones",
    "virtual_embeddings": "train W_V with virtual embeddings (eqs. 5-7); "
    "--no-virtual-embeddings is the collapse ablation",
    "sigma_alpha": "EMA weight of the current batch's sigma (eq. 7)",
    "batch_size": "images per rank per step",
    "max_steps": "stop after this many steps (default: epochs x steps per epoch)",
    "lr_steps": "epochs at which the lr is multiplied by --lr-decay",
    "warmup_epochs": "linear lr warmup (fractional epochs)",
    "clip_grad": "max backbone gradient norm (0: off)",
    "amp": "auto: bf16 autocast on CUDA, fp32 on CPU",
    "channels_last": "NHWC activations (default: on for CUDA)",
    "compile": "torch.compile the backbone",
    "save_every": "checkpoint every N steps (and at the end)",
    "val": "verification .bin files evaluated every --val-every epochs and at the end",
    "device": "auto, cpu or cuda",
    "workers": "DataLoader decode processes",
}
CHOICES = {
    "arch": ARCHS,
    "margin": MARGINS,
    "optimizer": OPTIMIZERS,
    "amp": AMP_MODES,
    "device": ("auto", "cpu", "cuda"),
}


def _base_type(hint):
    """int | None -> (int, None); list[float] -> (list, float); bool -> (bool, None)."""
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return list, typing.get_args(hint)[0]
    return hint, None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vigface-train-fr",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(FRTrainConfig)
    for f in fields(FRTrainConfig):
        default = f.default if f.default is not MISSING else f.default_factory()
        kind, item = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        kwargs = {
            "default": argparse.SUPPRESS,
            "help": f"{HELP.get(f.name, f.name.replace('_', ' '))} (default: {default})",
        }
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif kind is list:
            parser.add_argument(flag, type=item, nargs="*", **kwargs)
        else:
            parser.add_argument(flag, type=kind, choices=CHOICES.get(f.name), **kwargs)
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    parser.add_argument("--config", help="a JSON file of config fields (flags override it)")
    return parser


def _config_from_args(args: argparse.Namespace) -> tuple[FRTrainConfig, bool]:
    given = {k: v for k, v in vars(args).items() if k not in ("resume", "config")}
    values: dict = {}
    if args.config:
        try:
            values.update(json.loads(Path(args.config).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise VigfaceError(f"--config {args.config}: {exc}") from None
    if args.resume:
        out = given.get("out") or values.get("out")
        if not out:
            raise VigfaceError("--resume needs --out (the folder of the run to continue)")
        saved = Path(out) / "config.json"
        if not saved.is_file():
            raise VigfaceError(
                f"--resume: {saved} does not exist; is {out} a vigface-train-fr output folder?"
            )
        values = {**json.loads(saved.read_text()), **values}
    values.update(given)
    for required in ("data", "out"):
        if not values.get(required):
            raise VigfaceError(f"--{required} is required")
    return FRTrainConfig.from_dict(values), args.resume


def _train(args: argparse.Namespace) -> int:
    from vigface.fr.trainer import train_fr

    config, resume = _config_from_args(args)
    summary = train_fr(config, resume=resume)
    if summary.get("prototype_stats"):
        stats = summary["prototype_stats"]
        cells = "  ".join(
            f"{k} {stats[k]['mean']:.3f} ({stats[k]['std']:.3f})" for k in ("R-R", "R-V", "V-V")
        )
        print(f"step {summary['step']}: prototype cosine mean (std): {cells}")
    if summary.get("val"):
        print(f"verification accuracy: {summary['val']}")
    print(f"wrote {summary['out']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("vigface-train-fr", _train, args)


if __name__ == "__main__":
    sys.exit(main())
