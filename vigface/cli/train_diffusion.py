"""`vigface-train-diffusion`: the stage-2 denoiser, conditioned on a trained stage-1 FR model.

    vigface-train-diffusion --data toy --fr-model runs/fr --out runs/diffusion --size tiny --steps 20000
    torchrun --nproc_per_node 8 -m vigface.cli.train_diffusion --data ms1m --fr-model runs/fr --out runs/dm
    vigface-train-diffusion --out runs/diffusion --resume

Every flag is a field of `DiffusionTrainConfig` (vigface/diffusion/config.py).
"""

from __future__ import annotations

import argparse
import sys

from vigface.choices import SCHEDULES
from vigface.cli.common import config_from_args, config_parser, first_rank, run_command
from vigface.diffusion.config import LR_DECAYS, DiffusionTrainConfig
from vigface.diffusion.denoiser_config import ADALN, ARCHS, ATTENTION, DENOISER_SIZES, PREDICTIONS

PROG = "vigface-train-diffusion"
HELP = {
    "data": "train.rec, a folder holding train.rec, or an image folder with landmarks in its manifest",
    "landmarks": "(N, 5, 2) .npy of the images' landmarks (default: <rec stem>_landmarks.npy)",
    "out": "output folder (the run: checkpoints, metrics.jsonl, then the model)",
    "attention": "attention kernel: sdpa (torch), triton (ours), flash (flash-attn, an extra), auto",
    "adaln": "AdaLN: reference (torch) or triton (fused LayerNorm + modulate); auto: triton on CUDA",
    "fr_model": "a vigface-train-fr output folder (its backbone gives the condition f(x0))",
    "size": "denoiser size: tiny (CPU), S, B (ViT-B/4 at 112x112, the paper's)",
    "image_size": "denoiser resolution (default: the size's own; images are area-resized)",
    "patch": "patch side in pixels (default: the size's own)",
    "pose": "feed the 5-landmark image beside x_t",
    "final_conv": "a 3x3 conv on the output image after unpatchify (U-ViT's; smooths patch seams)",
    "cond_scale": "the FR embedding (unit length) times this before its projection; sqrt(embedding size) "
    "gives it the timestep features' scale (the demo's choice)",
    "identity_weight": "lambda of the identity term of eq. 8",
    "drop_prob": "probability of dropping the condition (classifier-free guidance)",
    "virtual_weight": "beyond the paper, 0 = off: weight of the term asking images of virtual conditions "
    "to embed at them (extra rows without a pixel target)",
    "virtual_batch": "rows per step for that term (0: batch size / 4)",
    "batch_size": "images per rank per step",
    "lr_decay": "after the warm-up: none (constant lr) or cosine (to 0 at --steps)",
    "loader": "data loader: torch (the reference) or dali (extra `dali`); auto: dali when installed",
    "compile": "torch.compile the denoiser (the first steps compile; numbers close to eager's, not equal)",
    "cache_conditions": "embed each training image with the FR model once, not every epoch (same numbers; "
    "datasets over 1 GiB of conditions are not cached)",
}
REQUIRED = ("data", "fr_model", "out")
CHOICES = {
    "size": tuple(DENOISER_SIZES),
    "arch": ARCHS,
    "prediction": PREDICTIONS,
    "attention": ATTENTION,
    "adaln": ADALN,
    "schedule": SCHEDULES,
    "lr_decay": LR_DECAYS,
    "amp": ("auto", "bf16", "off"),
    "loader": ("torch", "dali", "auto"),
    "device": ("auto", "cpu", "cuda"),
}


def build_parser() -> argparse.ArgumentParser:
    return config_parser(PROG, __doc__.splitlines()[0], DiffusionTrainConfig, HELP, CHOICES, REQUIRED)


def _train(args: argparse.Namespace) -> int:
    from vigface.diffusion.trainer import train_diffusion

    config, resume = config_from_args(DiffusionTrainConfig, args, PROG, REQUIRED)
    summary = train_diffusion(config, resume=resume)
    if first_rank():  # under torchrun, one copy of the closing line
        print(f"step {summary['step']}: wrote {summary['out']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, _train, args)


if __name__ == "__main__":
    sys.exit(main())
