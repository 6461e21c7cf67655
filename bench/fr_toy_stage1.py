"""Stage 1 on the toy world: does FR training learn, and do virtual prototypes stay apart?

    python bench/fr_toy_stage1.py                 # 500 ids x 20, IResNet-18 (width 16, 56x56), ~10 CPU min
    python bench/fr_toy_stage1.py --epochs 1      # quicker look
    python bench/fr_toy_stage1.py --data runs/toy_small --ids 40 --per-id 8 --pairs 200 --val-ids 20 \
        --width 8 --input-size 32 --embedding-dim 32 --num-virtual 20 --batch-size 16 --scale 16 \
        --epochs 250 --val-every 50 --out bench/results/fr_toy_stage1_long.json
                                                  # 5,000 steps of a tiny model: the ablation's collapse

Trains the same model twice with k virtual prototypes, once with the virtual embeddings of
eqs. 5-7 and once without (the paper's collapse ablation, Fig. 3a), and reports for each:
verification accuracy on held-out toy pairs before and after training, and the mean (std)
cosine between prototypes R-R, R-V, V-V (paper Fig. 3b: 0.009 (0.140), 0.000 (0.044),
0.010 (0.109); without virtual embeddings V-V goes towards 1). Writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from vigface.data.toy_dataset import ToyConfig, make_toy_dataset
from vigface.fr.baseline import untrained_accuracy
from vigface.fr.config import FRTrainConfig
from vigface.fr.trainer import train_fr


def run(args, virtual: bool) -> dict:
    out = Path(args.work) / ("virtual_on" if virtual else "virtual_off")
    shutil.rmtree(out, ignore_errors=True)
    val = [str(Path(args.data) / name) for name in ("toy_val.bin", "toy_pose.bin")]
    config = FRTrainConfig(
        data=str(Path(args.data) / "train.rec"),
        out=str(out),
        arch=args.arch,
        width=args.width,
        input_size=args.input_size,
        embedding_dim=args.embedding_dim,
        margin=args.margin,
        scale=args.scale,
        num_virtual=args.num_virtual,
        virtual_embeddings=virtual,
        batch_size=args.batch_size,
        epochs=args.epochs,
        lr=args.lr,
        lr_steps=[args.epochs * 0.75],
        warmup_epochs=0.0,
        workers=1,
        save_every=10**6,
        val=val,
        val_every=args.val_every,
        progress=args.progress,
        seed=args.seed,
    )
    before = untrained_accuracy(config, val)
    t0 = time.perf_counter()
    summary = train_fr(config)
    stats = summary["prototype_stats"]
    row = {
        "virtual_embeddings": virtual,
        "untrained_accuracy": before,
        "trained_accuracy": summary["val"],
        "train_seconds": round(time.perf_counter() - t0, 1),
        "steps": summary["step"],
        "prototype_cosine": {
            k: {"mean": round(stats[k]["mean"], 4), "std": round(stats[k]["std"], 4)}
            for k in ("R-R", "R-V", "V-V")
        },
    }
    print(json.dumps(row), file=sys.stderr)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="runs/toy_difficulty", help="toy dataset folder (made if missing)")
    ap.add_argument("--work", default="runs/fr_toy_stage1", help="where the two runs write")
    ap.add_argument("--ids", type=int, default=500)
    ap.add_argument("--per-id", type=int, default=20)
    ap.add_argument("--pairs", type=int, default=6000, help="pairs per .bin when the dataset is made")
    ap.add_argument("--val-ids", type=int, default=200, help="held-out identities when the dataset is made")
    ap.add_argument("--arch", default="iresnet18")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--input-size", type=int, default=56)
    ap.add_argument("--embedding-dim", type=int, default=128)
    ap.add_argument("--margin", default="cosface")
    ap.add_argument("--scale", type=float, default=30.0)
    ap.add_argument("--num-virtual", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--val-every", type=int, default=1, help="epochs between verification runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out", default="bench/results/fr_toy_stage1.json")
    args = ap.parse_args()
    if not (Path(args.data) / "toy.json").exists():
        make_toy_dataset(
            args.data,
            ToyConfig(
                ids=args.ids, per_id=args.per_id, seed=args.seed, pairs=args.pairs, val_ids=args.val_ids
            ),
        )
    result = {
        "benchmark": "fr_toy_stage1",
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "progress")},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "paper_fig3b": {"R-R": [0.009, 0.140], "R-V": [0.000, 0.044], "V-V": [0.010, 0.109]},
        "runs": [run(args, virtual=True), run(args, virtual=False)],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
