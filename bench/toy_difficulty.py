"""How hard is the toy face world? Time to make it, and verification accuracy before/after training.

    python bench/toy_difficulty.py                      # 500 ids x 20 images, ~10 CPU minutes
    python bench/toy_difficulty.py --ids 100 --epochs 2 # a quick look

Makes a toy dataset (timed: the issue asks for 10k images in under a minute on 2 cores), then
measures 10-fold verification accuracy on its held-out pairs (toy_val.bin, toy_pose.bin) for
(a) raw pixels, (b) an untrained small CNN, (c) the same CNN trained with a CosFace softmax for a
few epochs on CPU, after every epoch. The small CNN is a stand-in until stage 1's IResNets
land; the point is that the toy world is neither trivial (pixels and random features are far
from 100 %) nor unlearnable (training raises accuracy well above them). Writes JSON to
bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vigface.data.recordio import FaceRecordDataset
from vigface.data.toy_dataset import ToyConfig, make_toy_dataset
from vigface.data.verification_bin import load_verification_pairs
from vigface.eval.verification import verify_embeddings

BINS = ("toy_val.bin", "toy_pose.bin")


class SmallFR(nn.Module):
    """Four stride-2 conv stages (BN, PReLU) -> 128-d embedding. ~1.2 M parameters."""

    def __init__(self, size: int, dim: int = 128, widths=(32, 64, 128, 256)):
        super().__init__()
        layers, c = [], 3
        for w in widths:
            layers += [
                nn.Conv2d(c, w, 3, 2, 1, bias=False),
                nn.BatchNorm2d(w),
                nn.PReLU(w),
                nn.Conv2d(w, w, 3, 1, 1, bias=False),
                nn.BatchNorm2d(w),
                nn.PReLU(w),
            ]
            c = w
        self.features = nn.Sequential(*layers)
        side = size
        for _ in widths:
            side = (side + 1) // 2  # 3x3 stride-2 convs with padding 1 round up
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(c * side * side, dim), nn.BatchNorm1d(dim)
        )

    def forward(self, x):  # (N, 3, size, size) in [-1, 1] -> (N, dim)
        return self.head(self.features(x))


def to_tensor(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, 112, 112, 3) -> float (N, 3, size, size) normalised like insightface (mean = std = 0.5)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return F.interpolate(x, size=(size, size), mode="area") if size != x.shape[-1] else x


@torch.no_grad()
def embed(model: nn.Module, x: torch.Tensor, batch: int = 256) -> np.ndarray:
    """Flip-sum embeddings, as the insightface verification protocol does."""
    model.eval()
    out = [model(x[i : i + batch]) + model(x[i : i + batch].flip(-1)) for i in range(0, len(x), batch)]
    return torch.cat(out).numpy()


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, x: torch.Tensor, batches: int = 20) -> None:
    """Give an untrained model real BatchNorm statistics (no weight changes); without this its
    eval-mode embeddings share one huge common component (all cosines ~0.9999) and the
    "random features" baseline would measure the initial running stats, not the features."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    for i in torch.randperm(len(x))[: batches * 128].split(128):
        model(x[i])
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1


def evaluate(model, bins: dict) -> dict:
    return {
        name: round(verify_embeddings(embed(model, x), same).accuracy, 4) for name, (x, same) in bins.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="runs/toy_difficulty", help="toy dataset folder (made if missing)")
    ap.add_argument("--ids", type=int, default=500)
    ap.add_argument("--per-id", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument(
        "--size", type=int, default=56, help="train/eval resolution (112 images are area-downsampled)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/toy_difficulty.json")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    result: dict = {
        "config": vars(args),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }

    data = Path(args.data)
    if not (data / "toy.json").exists():
        recipe = make_toy_dataset(data, ToyConfig(ids=args.ids, per_id=args.per_id, seed=args.seed))
        result["make_dataset"] = {
            k: recipe[k] for k in ("train_seconds", "verification_seconds", "total_seconds")
        }
        result["make_dataset"]["train_images"] = recipe["images"]["train"]
        print(f"made {data}: {result['make_dataset']}", file=sys.stderr)

    ds = FaceRecordDataset(data / "train.rec")
    images = np.stack([ds[i][0] for i in range(len(ds))])
    labels = torch.as_tensor(np.asarray(ds.labels), dtype=torch.long)
    x_train = to_tensor(images, args.size)
    bins = {}
    for name in BINS:
        imgs, same = load_verification_pairs(data / name)
        bins[name] = (to_tensor(imgs, args.size), np.asarray(same))

    # (a) raw pixels: cosine of mean-subtracted grayscale images.
    pixel = {}
    for name, (x, same) in bins.items():
        g = x.mean(1).flatten(1)
        pixel[name] = round(verify_embeddings((g - g.mean(1, keepdim=True)).numpy(), same).accuracy, 4)
    result["pixels"] = pixel

    model = SmallFR(args.size)
    calibrate_batchnorm(model, x_train)
    result["untrained_cnn"] = evaluate(model, bins)
    print(f"pixels {pixel}  untrained {result['untrained_cnn']}", file=sys.stderr)

    # (c) CosFace (s=30, m=0.35) on normalised prototypes; SGD with a cosine schedule.
    n_classes = int(labels.max()) + 1
    prototypes = nn.Parameter(torch.randn(n_classes, 128) * 0.01)
    opt = torch.optim.SGD([*model.parameters(), prototypes], lr=0.1, momentum=0.9, weight_decay=5e-4)
    steps_per_epoch = len(x_train) // 128
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, 0.1, total_steps=args.epochs * steps_per_epoch, pct_start=0.1
    )
    curve = []
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train))
        losses = []
        for s in range(steps_per_epoch):
            idx = perm[s * 128 : (s + 1) * 128]
            x = x_train[idx]
            flip = torch.rand(len(x)) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            cos = F.normalize(model(x)) @ F.normalize(prototypes).T
            logits = 30.0 * (cos - 0.35 * F.one_hot(labels[idx], n_classes))
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        accs = evaluate(model, bins)
        curve.append(
            {
                "epoch": epoch + 1,
                "loss": round(float(np.mean(losses)), 4),
                **accs,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        print(curve[-1], file=sys.stderr)
    result["trained_cnn"] = curve
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
