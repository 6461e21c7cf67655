"""`vigface-eval`: measure FR models and face datasets the way the VIGFace paper does.

    vigface-eval verify runs/fr lfw.bin cfp_fp.bin cplfw.bin agedb_30.bin calfw.bin
    vigface-eval metrics runs/fr gen/train.rec --real toy/train.rec --out runs/metrics
    vigface-eval cfg-sweep runs/diffusion --real toy/train.rec --work runs/sweep --w 0.5 1 1.5 2 2.5 3
    vigface-eval protocol gen/train.rec --out runs/protocol --bins lfw.bin cfp_fp.bin ...

verify: 10-fold 1:1 accuracy (flipped-sum, L2-normalised embeddings), mean +- std per set, the
five-benchmark average and Gap-to-Real. metrics: CST / DIV (SER-FIQ) / SEP, similarity
histograms and their IoU with a real set. cfg-sweep: Table 1, the w picked for real and virtual
ids. protocol: train IR-SE50 + AdaFace on a dataset, verify it, print the published peers beside.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vigface.cli.common import (
    check_output_file,
    check_output_folder,
    positive_int,
    refuse_writing_over_inputs,
    run_command,
)
from vigface.data.files import write_atomically
from vigface.device import resolve_device
from vigface.errors import VigfaceError


def _print_table(name: str, table: dict) -> None:
    print(f"{name}:")
    for set_name, row in table["sets"].items():
        print(f"  {set_name:<12} {row['accuracy']:6.2f} +- {row['std']:.2f}")
    print(f"  {'average':<12} {table['average']:6.2f}")
    if table.get("five_benchmark_average") is not None:
        print(f"  {'5-set avg':<12} {table['five_benchmark_average']:6.2f}")


def _write_json(path: str | None, data: dict) -> None:
    if path:
        from vigface.eval.report import _json_safe

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(_json_safe(data), indent=2))
        print(f"wrote {path}")


def _cmd_verify(args) -> int:
    from vigface.eval.peers import peer_average
    from vigface.eval.protocol import compare_to_real, evaluate_model

    if not args.real_model:
        peer_average(args.real_reference)  # a misspelt name fails now, not after the verification
    check_output_file("--json", args.json)
    refuse_writing_over_inputs("--json", [args.json], [args.model, args.real_model, *args.bins])
    device = resolve_device(args.device)
    ours = evaluate_model(args.model, args.bins, device)
    _print_table(args.model, ours)
    real = evaluate_model(args.real_model, args.bins, device) if args.real_model else None
    if real:
        _print_table(args.real_model, real)
    gap = compare_to_real(ours, real, args.real_reference)
    if gap["gap_to_real"] is not None:
        print(f"Gap-to-Real vs {gap['reference']}: {100 * gap['gap_to_real']:.2f} %")
    else:
        print(f"Gap-to-Real vs {gap['reference']}: - ({gap['why']})")
    _write_json(args.json, {"model": args.model, "ours": ours, "real": real, "gap": gap})
    return 0


def _cmd_metrics(args) -> int:
    import numpy as np

    from vigface.data.alignment_check import check_dataset_alignment
    from vigface.eval import plots
    from vigface.eval.labelled_set import read_labelled_set
    from vigface.eval.metrics import dataset_metrics
    from vigface.eval.report import write_report
    from vigface.eval.serfiq import serfiq_scores
    from vigface.eval.similarity import distribution_iou, genuine_imposter, histogram
    from vigface.fr.embed import embed_images, load_backbone

    check_output_folder("--out", args.out)
    device = resolve_device(args.device)
    model, _ = load_backbone(args.model, device)
    check_dataset_alignment(args.data, "DATA")
    if args.real:
        check_dataset_alignment(args.real, "--real")
    data = read_labelled_set(args.data, max_ids=args.max_ids, max_per_id=args.max_per_id)
    sets = {"dataset": data}
    if data.kinds is not None:  # a generated set: real and virtual ids measured apart
        sets = {
            f"{k} ids": data.select(data.kinds == k) for k in ("real", "virtual") if np.any(data.kinds == k)
        }
    if args.real:
        sets = {
            "real data": read_labelled_set(args.real, max_ids=args.max_ids, max_per_id=args.max_per_id),
            **sets,
        }
    for name, s in sets.items():  # meaningless numbers otherwise (CST 1, DIV 0, SEP nan), exit 0
        _, counts = np.unique(s.labels, return_counts=True)
        if len(counts) < 2 or counts.max() < 2:
            raise VigfaceError(
                f"metrics: {name} holds {len(counts)} identities of at most {counts.max()} images "
                "(after --max-ids / --max-per-id); CST and DIV need identities with 2 or more images, "
                "SEP and the similarity histograms 2 or more identities"
            )
    metrics, dists = {}, {}
    for name, s in sets.items():
        emb = embed_images(model, s.images, device=device)
        quality = serfiq_scores(model, s.images, passes=args.passes, device=device)
        metrics[name] = dataset_metrics(emb, s.labels, quality)
        dists[name] = genuine_imposter(emb, s.labels)
        m = metrics[name]
        print(
            f"{name:<16} ids {m['classes']:>6}  images {m['images']:>7}  CST {m['cst']:.4f}  "
            f"DIV {m['div']:.3e}  SEP {m.get('sep', float('nan')):.4f}"
        )
    if args.real:
        for name in sets:
            if name != "real data":
                iou = distribution_iou(dists["real data"], dists[name])
                metrics[name]["iou_with_real"] = iou
                print(
                    f"IoU with real data, {name}: genuine {iou['genuine']:.3f} "
                    f"imposter {iou['imposter']:.3f} average {iou['average']:.3f}"
                )
    if args.out:
        hists = {
            n: {"genuine": histogram(g).tolist(), "imposter": histogram(i).tolist()}
            for n, (g, i) in dists.items()
        }
        figures = {
            "similarity_histograms": (
                "Genuine / imposter cosine similarity",
                plots.similarity_histograms_png(hists),
            ),
            "metric_bars": ("CST / DIV / SEP", plots.metric_bars_png(metrics)),
        }
        for n, (name, s) in enumerate(sets.items()):  # look at the faces, not only at their numbers
            rows, labels = plots.grid_rows(s.images, s.labels, ids=6, per_id=8)
            figures[f"samples_{n}"] = (f"Samples: {name}", plots.sample_grid_png(rows, labels, name))
        path = write_report(
            args.out,
            {"title": f"dataset metrics of {args.data}", "dataset_metrics": metrics,
             "config": {"model": args.model, "data": args.data, "real": args.real, "passes": args.passes}},
            figures,
        )  # fmt: skip
        print(f"report: {path}")
    return 0


def _all_or_at_least_two(text: str) -> int:
    """--real-max-ids: 0 (all identities) or a count that still gives imposter pairs."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0 or value == 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give 0 (all identities) or at least 2 (imposter pairs)")
    return value


def _cmd_cfg_sweep(args) -> int:
    from vigface.eval import plots
    from vigface.eval.cfg_sweep import SweepConfig, cfg_sweep
    from vigface.eval.report import write_report

    check_output_folder("--work", args.work)
    config = SweepConfig(
        model=args.model, real=args.real, work=args.work, ws=args.w, num_ids=args.num_ids,
        per_id=args.per_id, real_max_ids=args.real_max_ids or None,
        steps=args.steps, sampler=args.sampler, batch_size=args.batch_size,
        seed=args.seed, device=args.device, progress=not args.quiet, keep_images=args.keep_images,
    )  # fmt: skip
    fr_model = None
    if args.fr_model:  # another FR model measures (the paper: an independent ResNet-18)
        from vigface.fr.embed import load_backbone

        fr_model, _ = load_backbone(args.fr_model, resolve_device(args.device))
    samples: dict = {}
    result = cfg_sweep(config, fr_model, samples)
    print("w        " + " ".join(f"{w:>6g}" for w in result["w"]))
    for kind in ("real", "virtual"):
        for key in ("genuine", "imposter", "average"):
            print(f"{kind[:4]} {key[:4]:<4} " + " ".join(f"{r[key]:6.3f}" for r in result[kind]))
    print(f"picked w: real ids {result['picked']['real']:g}, virtual ids {result['picked']['virtual']:g}")
    figures = {
        "cfg_sweep": ("IoU with real data against w", plots.cfg_sweep_png(result)),
        "cfg_sweep_histograms": (
            "Similarity histograms per w",
            plots.similarity_histograms_png(result["histograms"]),
        ),
    }
    for n, (w, (rows, names)) in enumerate(samples.items()):  # the faces each w makes
        figures[f"samples_{n}"] = (f"Samples at w = {w:g}", plots.sample_grid_png(rows, names, f"w = {w:g}"))
    path = write_report(args.work, {"title": "classifier-free guidance sweep", "cfg_sweep": result}, figures)
    print(f"report: {path}")
    return 0


def _cmd_protocol(args) -> int:
    from vigface.eval.peers import peer_rows
    from vigface.eval.protocol import ProtocolConfig, run_protocol

    check_output_folder("--out", args.out)
    config = ProtocolConfig(
        data=args.data, out=args.out, bins=args.bins, real_reference=args.real_reference,
        real_model=args.real_model, arch=args.arch, margin=args.margin, width=args.width,
        input_size=args.input_size, embedding_dim=args.embedding_dim, scale=args.scale,
        batch_size=args.batch_size, epochs=args.epochs, lr_steps=args.lr_steps, max_steps=args.max_steps,
        lr=args.lr, seed=args.seed, workers=args.workers, device=args.device, progress=not args.quiet,
        save_every=args.save_every,
    )  # fmt: skip
    result = run_protocol(config, resume=args.resume)
    _print_table(f"{args.arch} + {args.margin} on {args.data}", result["ours"])
    if result["real"] is not None:
        _print_table(f"--real-model {args.real_model}", result["real"])
    gap = result["gap"]
    if gap["gap_to_real"] is not None:
        print(f"Gap-to-Real vs {gap['reference']}: {100 * gap['gap_to_real']:.2f} %")
    else:  # (protocol printed nothing here, where verify says why)
        print(f"Gap-to-Real vs {gap['reference']}: - ({gap['why']})")
    if result["real_model_recipe_differs"]:
        print(
            "note: --real-model was trained with another recipe ("
            + "; ".join(result["real_model_recipe_differs"])
            + "), so this Gap-to-Real measures the recipe as well as the data"
        )
    if not result["comparable_with_peers"]:
        print(
            "note: the peers below were measured on the five benchmarks (lfw, cfp_fp, cplfw, agedb_30, "
            "calfw); these sets are not those, so the rows are not comparable with ours"
        )
    print("published peers (IR-SE50 + AdaFace):")
    for row in peer_rows():
        print(f"  {row['method']:<14} {row['images']:<26} avg {row['average']:.2f}")
    print(f"wrote {Path(args.out) / 'protocol.json'}")
    return 0


def _serfiq_passes(text: str) -> int:
    """--passes as SER-FIQ takes it: a score is the spread of 2 or more dropout passes (argparse said
    'at least 1', then 1 was refused)."""
    from vigface.eval.serfiq import MAX_PASSES

    value = positive_int(text)
    if not 2 <= value <= MAX_PASSES:
        raise argparse.ArgumentTypeError(f"{text!r} must be in 2..{MAX_PASSES:,}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from vigface.choices import SAMPLERS
    from vigface.eval.peers import DEFAULT_REAL_REFERENCE
    from vigface.fr.backbone_config import ARCHS
    from vigface.fr.margin_config import MARGINS

    parser = argparse.ArgumentParser(prog="vigface-eval", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")

    v = sub.add_parser("verify", help="10-fold 1:1 verification of a trained backbone on .bin sets")
    v.add_argument("model", help="a vigface-train-fr output folder")
    v.add_argument("bins", nargs="+", help="verification .bin files (lfw.bin, cfp_fp.bin, ...)")
    real = v.add_mutually_exclusive_group()
    real.add_argument("--real-model", help="a real-data FR folder to compute Gap-to-Real against")
    real.add_argument(
        "--real-reference", default=DEFAULT_REAL_REFERENCE,
        help="the published row to compute Gap-to-Real against otherwise (default: %(default)s)",
    )  # fmt: skip
    v.add_argument("--json", help="also write the results to this JSON file")
    common(v)
    v.set_defaults(func=_cmd_verify)

    m = sub.add_parser("metrics", help="CST / DIV / SEP and similarity histograms of a dataset")
    m.add_argument("model", help="the FR folder that measures (backbone.safetensors + backbone.json)")
    m.add_argument("data", help="train.rec, a vigface-gen output folder, or an image folder")
    m.add_argument("--real", help="a real dataset: measured too, and IoU of the histograms against it")
    m.add_argument(
        "--passes", type=_serfiq_passes, default=100, help="SER-FIQ dropout passes, 2 or more (default 100)"
    )
    m.add_argument("--max-ids", type=positive_int, help="measure only the first N identities")
    m.add_argument("--max-per-id", type=positive_int, help="and at most N images of each")
    m.add_argument("--out", help="write report.json / report.html here")
    common(m)
    m.set_defaults(func=_cmd_metrics)

    s = sub.add_parser("cfg-sweep", help="generate at several w, pick w by IoU with real data (Table 1)")
    s.add_argument("model", help="a denoiser folder")
    s.add_argument("--real", required=True, help="real data of the FR model (train.rec or image folder)")
    s.add_argument(
        "--fr-model",
        help="the FR folder that measures the similarities (default: the one the denoiser was trained "
        "against, wherever denoiser.json says it is; the paper uses an independent ResNet-18)",
    )
    s.add_argument("--work", required=True, help="folder for the generated sets and the report")
    s.add_argument("--w", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
    s.add_argument("--num-ids", type=positive_int, default=20, help="identities per kind (default 20)")
    s.add_argument("--per-id", type=positive_int, default=10)
    s.add_argument(
        "--real-max-ids", type=_all_or_at_least_two, default=500,
        help="measure the first N identities of --real (default 500; 0: all, decoded into memory at once)",
    )  # fmt: skip
    s.add_argument("--steps", type=positive_int, default=50)
    s.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="(default: %(default)s)")
    s.add_argument("--batch-size", type=positive_int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--keep-images", action="store_true", help="keep each w's generated set")
    s.add_argument("--quiet", action="store_true")
    common(s)
    s.set_defaults(func=_cmd_cfg_sweep)

    p = sub.add_parser(
        "protocol", help="train IR-SE50 + AdaFace on a dataset and verify it (Table 2)",
        description="Train a fresh FR model on DATA with AdaFace's CASIA-WebFace recipe (the defaults), "
        "verify it on --bins and print it beside the published peers; writes OUT/protocol.json.",
    )  # fmt: skip
    p.add_argument("data", help="the training set (train.rec, a folder holding it, or an image folder)")
    p.add_argument(
        "--out", required=True, help="output folder: the trained model and protocol.json (required)"
    )
    p.add_argument(
        "--bins", nargs="+", required=True, help="the five benchmark .bin files (or toy ones) (required)"
    )
    real = p.add_mutually_exclusive_group()
    real.add_argument(
        "--real-model", help="our own real-data FR folder for Gap-to-Real (verified on the same --bins)"
    )
    real.add_argument(
        "--real-reference", default=DEFAULT_REAL_REFERENCE,
        help="the published row Gap-to-Real is computed against without --real-model (default: %(default)s)",
    )  # fmt: skip
    p.add_argument("--arch", choices=ARCHS, default="irse50", help="backbone (default: %(default)s)")
    p.add_argument(
        "--margin", choices=MARGINS, default="adaface", help="margin softmax (default: %(default)s)"
    )
    p.add_argument(
        "--width",
        type=positive_int,
        default=64,
        help="channels of the first stage (16 for CPU runs) (default: %(default)s)",
    )
    p.add_argument(
        "--input-size",
        type=positive_int,
        default=112,
        help="input resolution (56 or 32 for CPU runs) (default: %(default)s)",
    )
    p.add_argument(
        "--embedding-dim", type=positive_int, default=512, help="embedding dim (default: %(default)s)"
    )
    p.add_argument("--scale", type=float, default=64.0, help="logit scale s (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="batch size (default: %(default)s)")
    p.add_argument("--epochs", type=positive_int, default=26, help="epochs (default: %(default)s)")
    p.add_argument(
        "--lr-steps", type=float, nargs="+",
        help="epochs where lr x0.1 (default: 12, 20, 24 of 26, scaled to --epochs)",
    )  # fmt: skip
    p.add_argument("--max-steps", type=positive_int, help="stop after this many steps (smoke runs)")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="loader processes (default: %(default)s)")
    p.add_argument(
        "--save-every",
        type=positive_int,
        default=1000,
        help="steps between checkpoints (default: %(default)s)",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    common(p)
    p.set_defaults(func=_cmd_protocol)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("vigface-eval", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
