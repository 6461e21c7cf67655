"""The `vigface` command: `vigface data toy|info|align|merge|pairs` and `vigface demo`.

Every user error (bad file, bad argument) ends as one line `vigface: error: ...` and exit
status 2, never a traceback; an interrupted command exits 130 (SIGTERM: 143) and leaves no
half-written file (every writer writes to a temporary name and renames at the end).
"""

from __future__ import annotations

import argparse
import json
import sys

from vigface.cli.common import check_output_file, run_command
from vigface.cli.common import positive_int as _positive_int


def _cmd_data_toy(args: argparse.Namespace) -> int:
    from vigface.data.toy_dataset import ToyConfig, make_toy_dataset

    cfg = ToyConfig(
        ids=args.ids,
        per_id=args.per_id,
        seed=args.seed,
        pairs=args.pairs,
        val_ids=args.val_ids,
        quality=args.quality,
        unaligned=args.unaligned,
    )
    recipe = make_toy_dataset(
        args.out, cfg, workers=args.workers, progress=not args.quiet, overwrite=args.overwrite
    )
    n = recipe["images"]["train"]
    print(
        f"wrote {n} training images of {cfg.ids} identities and {cfg.pairs} pairs per .bin to {args.out} "
        f"in {recipe['total_seconds']:.1f} s (train set {recipe['train_seconds']:.1f} s, "
        f"{recipe['workers']} workers)"
    )
    return 0


def _cmd_data_info(args: argparse.Namespace) -> int:
    from vigface.data.info import describe

    info = describe(args.path)
    if args.check_images:
        from vigface.data.image_check import check_images

        info["image_check"] = check_images(args.path, progress=not args.quiet)
    if args.json:
        from vigface.eval.report import _json_safe

        print(json.dumps(_json_safe(info), indent=2))  # a NaN read from toy.json is no JSON token
    else:
        for key, value in info.items():
            if key != "image_check":
                print(f"{key}: {value}")
        for name, found in info.get("image_check", {}).items():
            sizes = ", ".join(f"{size} x{n}" for size, n in found["sizes"].items()) or "-"
            print(f"check {name}: {found['images']} images, {found['unreadable']} unreadable; sizes {sizes}")
            for line in found["failures"] + found["problems"]:
                print(f"  {line}")
            if found["unreadable"] > len(found["failures"]):
                print(f"  ... and {found['unreadable'] - len(found['failures'])} more")
    if args.check_images:
        from vigface.data.image_check import found_problems

        return 1 if found_problems(info["image_check"]) else 0
    return 0


def _cmd_data_align(args: argparse.Namespace) -> int:
    from vigface.data.align_folder import align_image_folder

    summary = align_image_folder(
        args.images,
        args.out,
        landmarks=args.landmarks,
        out_format=args.format,
        size=args.size,
        quality=args.quality,
        image_format=args.image_format,
        backend=args.backend,
        progress=not args.quiet,
        overwrite=args.overwrite,
    )
    skipped = f" (skipped {summary['skipped']} that do not decode)" if summary["skipped"] else ""
    print(
        f"aligned {summary['images']} images of {summary['identities']} identities into {args.out}{skipped}"
    )
    return 0


def _cmd_data_merge(args: argparse.Namespace) -> int:
    from vigface.data.merge import merge_datasets

    summary = merge_datasets(
        args.inputs, args.out, real_ids=args.real_ids, overwrite=args.overwrite, progress=not args.quiet
    )
    print(
        f"merged {summary['images']} images of {summary['identities']} identities from "
        f"{len(summary['inputs'])} datasets into {args.out}"
        + ("" if summary["landmarks"] else " (no landmarks: not every input has them)")
    )
    return 0


def _cmd_data_pairs(args: argparse.Namespace) -> int:
    from vigface.data.pairs import make_pairs_bin

    check_output_file("--out", args.out)  # a folder no file can be made in: before the images are read
    summary = make_pairs_bin(args.data, args.out, pairs=args.pairs, seed=args.seed, overwrite=args.overwrite)
    print(
        f"wrote {summary['pairs']} pairs ({summary['images']} images of {summary['identities']} identities, "
        f"10 identity-disjoint folds) to {args.out}"
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import dataclasses
    import os

    # Before torch starts OpenMP: idle threads sleep instead of spinning. The demo's models are tiny,
    # and on a 2-core machine that is doing anything else, spinning threads made every torch call
    # 5-15x slower in our measurements (e.g. 5.8 s -> 0.39 s to verify two toy .bin sets).
    if "OMP_WAIT_POLICY" not in os.environ and "torch" not in sys.modules:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        print("vigface demo: OMP_WAIT_POLICY=PASSIVE (set it yourself to choose otherwise)")

    from vigface.eval.demo import FULL, QUICK, run_demo

    config = dataclasses.replace(
        QUICK if args.quick else FULL,
        model=args.model,
        cfg_sweep=tuple(args.cfg_sweep or ()),
        device=args.device,
        progress=not args.quiet,
    )
    result = run_demo(config, args.out, resume=args.resume)
    print("\n".join(result["summary"]))
    print(f"demo finished in {result['timings']['total']:.0f} s")
    print(f"report: {result['report']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vigface", description=__doc__.splitlines()[0])
    top = parser.add_subparsers(dest="command", required=True)

    data = top.add_parser("data", help="make, inspect and align face datasets").add_subparsers(
        dest="data_command", required=True
    )

    toy = data.add_parser("toy", help="make a toy-world dataset (train.rec/.idx, landmarks, .bin pairs)")
    toy.add_argument("--out", required=True, help="output folder")
    toy.add_argument("--ids", type=_positive_int, default=500, help="training identities (default 500)")
    toy.add_argument("--per-id", type=_positive_int, default=20, help="images per identity (default 20)")
    toy.add_argument("--seed", type=int, default=0, help="world seed: same seed, same faces")
    toy.add_argument(
        "--pairs", type=int, default=6000, help="pairs per verification .bin (multiple of 20; 0: none)"
    )
    toy.add_argument(
        "--val-ids", type=_positive_int, default=200, help="held-out identities for the .bin files"
    )
    toy.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    toy.add_argument(
        "--unaligned", action="store_true", help="store 144x144 unaligned images (landmarks in that frame)"
    )
    toy.add_argument("--workers", type=int, default=0, help="render processes (default: all cores)")
    toy.add_argument("--overwrite", action="store_true", help="replace an existing toy dataset in --out")
    toy.add_argument("--quiet", action="store_true", help="no progress bars")
    toy.set_defaults(func=_cmd_data_toy)

    info = data.add_parser(
        "info", help="summarise a .rec, .bin, image folder, toy or vigface-gen dataset folder"
    )
    info.add_argument("path")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument(
        "--check-images", action="store_true",
        help="also decode every image (and the .bin sets beside a train.rec) and name those that do not "
        "read or decode (exit status 1 if any, or if a file holds none or a .bin mixes sizes)",
    )  # fmt: skip
    info.add_argument("--quiet", action="store_true", help="no progress bar (--check-images)")
    info.set_defaults(func=_cmd_data_info)

    align = data.add_parser("align", help="align an image folder to 112x112 with 5-point landmarks")
    align.add_argument(
        "--images", required=True,
        help="image folder root/<identity>/<n>.jpg, or a .rec (a folder holding train.rec) with "
        "<stem>_landmarks.npy beside it, as `vigface data toy --unaligned` writes",
    )  # fmt: skip
    align.add_argument(
        "--landmarks",
        help="landmarks .jsonl ({'path' or 'key', 'landmarks'} per line) or .npy (N,5,2) in dataset order; "
        "default: the folder manifest's 'landmarks', or the table beside the .rec",
    )
    align.add_argument("--out", required=True, help="output: a folder, or a .rec path")
    align.add_argument(
        "--format", choices=["folder", "rec"],
        help="output layout (default: rec for an --out ending in .rec, else folder)",
    )  # fmt: skip
    align.add_argument(
        "--size", type=_positive_int, default=112, help="output size (template scaled; default 112)"
    )
    align.add_argument("--quality", type=int, default=95, help="JPEG quality of aligned images")
    align.add_argument(
        "--image-format", choices=["jpeg", "png"], default="jpeg", help="encoding of aligned images"
    )
    align.add_argument(
        "--backend", choices=["auto", "c", "numpy"], default="auto", help="alignment implementation"
    )
    align.add_argument("--overwrite", action="store_true", help="replace an aligned set already in --out")
    align.add_argument("--quiet", action="store_true")
    align.set_defaults(func=_cmd_data_align)

    merge = data.add_parser(
        "merge",
        help="several datasets as one train.rec with disjoint labels (real + generated training)",
        description="Copy every image of the inputs into one train.rec (grouped by label, images not "
        "re-encoded). Input k's label l becomes l plus the class count of the inputs before it. A "
        "vigface-gen set of real identities needs --real-ids. Writes merge.json with the mapping.",
    )
    merge.add_argument(
        "inputs", nargs="+", metavar="DATASET",
        help="train.rec, a folder holding train.rec, or an image folder (a vigface-gen output too)",
    )  # fmt: skip
    merge.add_argument("--out", required=True, help="output folder (train.rec, train.idx, merge.json)")
    merge.add_argument(
        "--real-ids", choices=["join", "separate"],
        help="for generated real identities: join = label them as their class of the first non-generated "
        "input (the data stage 1 was trained on); separate = classes of their own",
    )  # fmt: skip
    merge.add_argument("--overwrite", action="store_true", help="replace a merged set already in --out")
    merge.add_argument("--quiet", action="store_true", help="no progress bar")
    merge.set_defaults(func=_cmd_data_merge)

    pairs = data.add_parser(
        "pairs",
        help="verification pairs (.bin, 10 identity-disjoint folds) from an aligned dataset (--val, verify)",
    )
    pairs.add_argument("data", metavar="DATASET", help="aligned held-out images: a .rec, or an image folder")
    pairs.add_argument("--out", required=True, help="the .bin to write")
    pairs.add_argument(
        "--pairs",
        type=_positive_int,
        default=6000,
        help="pairs, half genuine (a multiple of 20; default 6000)",
    )
    pairs.add_argument("--seed", type=int, default=0, help="which pairs are drawn (default 0)")
    pairs.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    pairs.set_defaults(func=_cmd_data_pairs)

    demo = top.add_parser(
        "demo",
        help="the whole pipeline on the toy world: data, FR, diffusion, generation, evaluation, report",
        description="Make toy data, train an FR model with virtual prototypes and a diffusion model, "
        "generate real and virtual identities, train a fresh FR model on them, verify both on held-out "
        "toy pairs and write report.html (6-9 min on 2 CPU cores; --quick: the shipped tiny "
        "models, < 2 min).",
    )
    demo.add_argument("--out", default="vigface_demo", help="output folder (default ./vigface_demo)")
    demo.add_argument(
        "--quick", action="store_true", help="use the shipped tiny checkpoints; skip both trainings"
    )
    demo.add_argument("--model", help="with --quick: a denoiser folder instead of the shipped one")
    demo.add_argument(
        "--cfg-sweep", type=float, nargs="+", metavar="W",
        help="generate at these guidance scales first and use the w with the best IoU (e.g. 0.5 1.5 2.5)",
    )  # fmt: skip
    demo.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    demo.add_argument(
        "--resume", action="store_true", help="continue the interrupted demo in --out (same settings)"
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_command("vigface", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
