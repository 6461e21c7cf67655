"""Training-data loader throughput: aligned images/s of each available loader on this machine.

    python bench/loader_throughput.py                     # CPU: torch (1, 2 workers), DALI CPU (1, 2 threads)
    python bench/loader_throughput.py --device cuda --workers 4 16 --epochs 3
                                                          # GPU: the same loaders delivering CUDA tensors

The torch loader runs once per decoder that works here: pil (workers decode), torchvision (workers
decode with torchvision on the CPU) and, on CUDA, nvjpeg (workers read bytes; one batched nvJPEG
call per step decodes on the GPU, where the CUDA warp aligns).
One epoch of a toy .rec (default 3,000 images, made once under --data) is read in the trainers'
order with random flips, normalised to [-1, 1] NCHW float32 on the device: decode + (for the
unaligned set, 144x144 wild images + landmarks) 5-point alignment + normalisation + flip. The
first batch is not timed (worker start-up, pipeline build). Issue goal on one H100: >= 12,000
aligned images/s per GPU (insightface's DALI RecordIO reader: ~18,000).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from vigface.data.loaders import make_loader
from vigface.data.loaders.dali_loader import dali_available
from vigface.data.loaders.decoders import torchvision_available
from vigface.data.toy_dataset import ToyConfig, make_toy_dataset


def toy_rec(root: Path, images: int, unaligned: bool) -> Path:
    out = root / ("wild" if unaligned else "aligned") / f"{images}"
    if not (out / "toy.json").exists():
        cfg = ToyConfig(ids=images // 20, per_id=20, seed=0, pairs=0, unaligned=unaligned)
        make_toy_dataset(out, cfg, progress=False)
    return out / "train.rec"


def measure(rec: Path, aligned: bool, loader: str, decoder: str, workers: int, args, device) -> dict:
    ld = make_loader(
        rec, args.batch, aligned=aligned, loader=loader, workers=workers, flip=True, seed=0, device=device,
        decoder=decoder,
    )  # fmt: skip
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    images = 0
    seconds = 0.0
    for epoch in range(args.epochs):
        it = iter(ld.epoch(epoch))
        next(it)  # start-up: workers fork / DALI builds its pipeline (once per epoch for DataLoader)
        sync()
        t0 = time.perf_counter()
        for batch in it:
            images += len(batch.index)
        sync()
        seconds += time.perf_counter() - t0
    ld.close()
    return {
        "loader": loader,
        "decoder": decoder if loader == "torch" else "dali",
        "workers": workers,
        "aligned_source": aligned,
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="runs/issue9/loader_bench", help="where the toy .rec files live")
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=1, help="epochs timed (each without its first batch)")
    parser.add_argument("--decoders", nargs="+", default=None, help="torch decoders (default: all usable)")
    parser.add_argument(
        "--out", default=None, help="JSON path (default bench/results/loader_throughput_<cpu|gpu>.json)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    root = Path(args.data)
    t0 = time.perf_counter()
    recs = {True: toy_rec(root, args.images, False), False: toy_rec(root, args.images, True)}
    make_seconds = time.perf_counter() - t0

    decoders = args.decoders or (
        ["pil"] + (["torchvision"] if torchvision_available() else [])
        + (["nvjpeg"] if device.type == "cuda" and torchvision_available() else [])
    )  # fmt: skip
    variants = [("torch", d) for d in decoders] + ([("dali", "auto")] if dali_available() else [])
    rows = []
    print(f"{'source':10s} {'loader':6s} {'decoder':12s} {'workers':>7s} {'images/s':>10s}")
    for aligned, rec in recs.items():
        for loader, decoder in variants:
            for workers in args.workers:
                row = measure(rec, aligned, loader, decoder, workers, args, device)
                rows.append(row)
                source = "aligned" if aligned else "unaligned"
                ips = row["images_per_s"]
                print(f"{source:10s} {loader:6s} {row['decoder']:12s} {workers:7d} {ips:10.1f}", flush=True)

    on_gpu = device.type == "cuda"
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "torch": torch.__version__,
        "torchvision": _torchvision_version(),
        "dali": _dali_version(),
        "device": torch.cuda.get_device_name(device)
        if on_gpu
        else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        # The CPU machine is shared: the load average says how contended these numbers are.
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "make_toy_seconds": round(make_seconds, 1),
        "what": "one epoch, batch order of the trainers, flips on, float32 NCHW in [-1, 1] on the device; "
        "unaligned = 144x144 wild images warped to the 112x112 ArcFace template",
        "rows": rows,
    }
    if not on_gpu:
        result["gpu"] = {
            "status": "pending",
            "note": "no GPU on this machine: torch/nvJPEG and DALI GPU (mixed decoder) figures are pending; "
            "goal >= 12,000 aligned images/s per H100",
        }
    elif not dali_available():
        result["dali_gpu"] = "pending: DALI is not installed on this GPU machine (too large to carry)"
    out = Path(args.out or f"bench/results/loader_throughput_{'gpu' if on_gpu else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def _torchvision_version() -> str | None:
    if not torchvision_available():
        return None
    import torchvision

    return torchvision.__version__


def _dali_version() -> str | None:
    if not dali_available():
        return None
    import nvidia.dali

    return nvidia.dali.__version__


if __name__ == "__main__":
    main()
