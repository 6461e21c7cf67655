"""`vigface-train-fr`: stage-1 FR training with virtual prototypes (one process or torchrun).

    vigface-train-fr --data toy/train.rec --out runs/fr --num-virtual 1000 --val toy/toy_val.bin
    torchrun --nproc_per_node 8 -m vigface.cli.train_fr --data ms1m/train.rec --out runs/fr ...
    vigface-train-fr --out runs/fr --resume          # continue a killed run from its last checkpoint

Every flag is a field of `FRTrainConfig` (vigface/fr/config.py); --resume reads the run's own
config.json and accepts only flags that do not change the computation (epochs, workers, ...).
"""

from __future__ import annotations

import argparse
import sys

from vigface.cli.common import config_from_args, config_parser, first_rank, run_command
from vigface.fr.backbone_config import ARCHS
from vigface.fr.config import AMP_MODES, LOADERS, LOSSES, OPTIMIZERS, FRTrainConfig
from vigface.fr.margin_config import MARGINS

HELP = {
    "data": "train.rec, a folder holding train.rec, or an image folder root/<id>/<n>.jpg",
    "out": "output folder (checkpoints, metrics.jsonl, backbone, prototypes, report)",
    "arch": "backbone",
    "width": "channels of the first stage (64 = paper; 16 for CPU-sized models)",
    "input_size": "input resolution; 112x112 images are area-resized (56 for CPU runs)",
    "margin": "margin softmax",
    "scale": "logit scale s (paper: 64 on MS1M-V2, 30 on CASIA-WebFace)",
    "margin_m": "margin m (default 0.5 arcface, 0.35 cosface, 0.3 combined (its m2), 0.4 adaface)",
    "margin_m1": "combined margin: m1 in cos(m1 theta + m) - m3",
    "margin_m3": "combined margin: m3 in cos(m1 theta + m) - m3",
    "num_virtual": "k virtual prototypes W_V beside the real ones",
    "virtual_embeddings": "train W_V with virtual embeddings (eqs. 5-7); "
    "--no-virtual-embeddings is the collapse ablation",
    "sigma_alpha": "EMA weight of the current batch's sigma (eq. 7)",
    "loss": "margin-softmax implementation: fused (Triton, no B x C logits) or reference "
    "(materialised logits, faster); auto: reference, or fused on CUDA when the reference's logits "
    "would take over 1/8 of the GPU's memory",
    "loader": "data loader: torch (PIL in worker processes, the reference) or dali (NVIDIA DALI, "
    "extra `dali`; same images and order, pixels within 1 level); auto: dali when installed",
    "aligned": "the images are aligned crops; --no-aligned warps each one to the ArcFace template with its "
    "5 landmarks on the fly (unaligned photos, as `vigface data align` would, without writing them)",
    "landmarks": "with --no-aligned: the (N, 5, 2) .npy or .jsonl table (default: <stem>_landmarks.npy "
    "beside the .rec, or the folder manifest's landmarks)",
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
REQUIRED = ("data", "out")
CHOICES = {
    "arch": ARCHS,
    "margin": MARGINS,
    "optimizer": OPTIMIZERS,
    "amp": AMP_MODES,
    "loss": LOSSES,
    "loader": LOADERS,
    "device": ("auto", "cpu", "cuda"),
}


def build_parser() -> argparse.ArgumentParser:
    return config_parser("vigface-train-fr", __doc__.splitlines()[0], FRTrainConfig, HELP, CHOICES, REQUIRED)


def _train(args: argparse.Namespace) -> int:
    from vigface.fr.trainer import train_fr

    config, resume = config_from_args(FRTrainConfig, args, "vigface-train-fr", REQUIRED)
    summary = train_fr(config, resume=resume)
    if not first_rank():  # under torchrun, one copy of the closing lines
        return 0
    if summary.get("prototype_stats"):
        stats = summary["prototype_stats"]
        cells = "  ".join(
            f"{k} {stats[k]['mean']:.3f} ({stats[k]['std']:.3f})"
            for k in ("R-R", "R-V", "V-V")
            if stats[k]["pairs"]  # without virtual prototypes R-V and V-V have no pairs
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
