"""`vigface-gen`: generate a face dataset of real and/or virtual identities.

    vigface-gen --out gen                                             # the shipped tiny toy-world model
    vigface-gen --model runs/diffusion --out gen --ids virtual --num-ids 1000 --per-id 20
    vigface-gen --model runs/diffusion --out gen --preset B           # the paper's VIGFace(B): 60K x 20
    torchrun --nproc_per_node 8 -m vigface.cli.gen --model runs/dm --out gen --preset L

Rerunning the same command after an interruption (even kill -9) finishes the dataset; the
result is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import argparse
import os
import sys

from vigface.choices import DEFAULT_W_REAL, DEFAULT_W_VIRTUAL, ENGINES, KERNELS, PRECISIONS, SAMPLERS
from vigface.cli.common import check_folder_writable, first_rank, positive_int, run_command
from vigface.generate.config import KINDS, PRESETS, GenerationConfig

PROG = "vigface-gen"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        help="a vigface-train-diffusion output folder (default: the shipped tiny toy-world model)",
    )
    p.add_argument(
        "--out", required=True, help="output folder (shards/, train.rec or image folder, manifests)"
    )
    p.add_argument(
        "--ids", choices=KINDS, default="virtual", help="identities to generate (default: %(default)s)"
    )
    p.add_argument(
        "--preset", choices=tuple(PRESETS), help="S 10K x 50, B 60K x 20, L 120K x 50 (ids x images)"
    )
    p.add_argument("--num-ids", type=positive_int, help="identities per kind (default: preset, else all)")
    p.add_argument("--per-id", type=positive_int, help="images per identity (default: preset, else 20)")
    p.add_argument("--prototypes", help="prototypes.safetensors (default: the FR model's the denoiser used)")
    p.add_argument(
        "--pose",
        default="dataset",
        help="dataset | frontal | FILE.npy of (M, 5, 2) landmarks in the 112x112 aligned frame",
    )
    p.add_argument(
        "--landmarks",
        help="the table --pose dataset draws from, in the 112x112 aligned frame (default: the "
        "denoiser folder's pose_landmarks.npy, a sample of its training set's)",
    )
    p.add_argument(
        "--w-real",
        type=float,
        default=DEFAULT_W_REAL,
        help="guidance weight for real ids (eq. 9; default: %(default)s)",
    )
    p.add_argument(
        "--w-virtual",
        type=float,
        default=DEFAULT_W_VIRTUAL,
        help="guidance weight for virtual ids (default: %(default)s)",
    )
    p.add_argument("--steps", type=positive_int, default=100, help="sampler steps (default: %(default)s)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="(default: %(default)s)")
    p.add_argument("--engine", choices=ENGINES, default="eager", help="(default: %(default)s)")
    p.add_argument("--precision", choices=PRECISIONS, help="denoiser precision (default: the engine's, fp32)")
    p.add_argument(
        "--kernels",
        choices=KERNELS,
        default="reference",
        help="fast: the Triton attention / AdaLN kernels and the cuBLASLt GELU epilogue on CUDA "
        "(use with --precision bf16); reference: plain PyTorch ops",
    )
    p.add_argument("--format", choices=["rec", "folder"], default="rec", help="(default: %(default)s)")
    p.add_argument("--output-size", type=positive_int, default=112, help="image side (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="(default: %(default)s)")
    p.add_argument(
        "--shard-size", type=positive_int, default=1024, help="images per shard (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--quiet", action="store_true")
    return p


def _generate(args: argparse.Namespace) -> int:
    from vigface.generate.dataset import generate_dataset

    if args.model is None:
        from vigface.assets import tiny_model_dir

        args.model = str(tiny_model_dir())
        print(
            f"{PROG}: no --model given, using the shipped tiny toy-world model {args.model}", file=sys.stderr
        )
    check_folder_writable("--out", args.out)  # /proc and the like: before the model is loaded
    values = {k: v for k, v in vars(args).items() if k != "quiet"}
    summary = generate_dataset(GenerationConfig(**values, progress=not args.quiet))
    if not first_rank():  # under torchrun, one copy of the closing line
        return 0
    # ranks make shards apart; the count of this process alone would mislead under torchrun
    made = f" ({summary['generated']} made now)" if int(os.environ.get("WORLD_SIZE", "1")) == 1 else ""
    print(f"{summary['images']} images in {summary['shards']} shards{made} -> {summary['out']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, _generate, args)


if __name__ == "__main__":
    sys.exit(main())
