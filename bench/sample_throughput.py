"""Sampling throughput: images/s of DDIM + classifier-free guidance through a sampling engine.

    python bench/sample_throughput.py                              # GPU: ViT-B/4 U-ViT, 100 steps, batch 64
    python bench/sample_throughput.py --size tiny --steps 10 --batch 8   # a CPU-sized run

First form: only `--engine eager` exists (the engines issue adds compile / cudagraph / onnx / trt
and reports them as ratios against eager measured in the same run). Weights are random: the
cost of a denoiser forward does not depend on them. Every step runs one batched forward of
2 x batch rows (conditional + unconditional), as generation does. Writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from vigface.diffusion.denoiser import ARCHS, DENOISER_SIZES, Denoiser, DenoiserConfig
from vigface.diffusion.sampling import FaceSampler
from vigface.diffusion.schedule import NoiseSchedule


def measure(args, device: torch.device) -> dict:
    torch.manual_seed(0)
    overrides = {"arch": args.arch}
    if args.image_size:
        overrides["image_size"] = args.image_size
    config = DenoiserConfig.preset(args.size, **overrides)
    model = Denoiser(config).to(device)
    with torch.no_grad():  # non-zero output layers, so the numbers flow as in a trained model
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.02)
    sampler = FaceSampler(model, NoiseSchedule("cosine", 1000))
    n, s = args.batch, config.image_size
    cond = torch.nn.functional.normalize(torch.randn(n, config.cond_dim), dim=1)
    pose = torch.rand(n, 5, s, s)
    w = torch.full((n,), 2.5)

    def run(seed0: int):
        sampler.sample(cond, pose, w, list(range(seed0, seed0 + n)), steps=args.steps, sampler=args.sampler)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    run(0)  # warmup
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for r in range(args.repeats):
        run(1000 * (r + 1))
    sync()
    seconds = (time.perf_counter() - t0) / args.repeats
    row = {
        "engine": "eager",
        "images_per_s": round(n / seconds, 3),
        "seconds_per_batch": round(seconds, 3),
        "forward_ms": round(1000 * seconds / args.steps, 2),
        "params_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "tokens": config.tokens,
    }
    if device.type == "cuda":
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=tuple(DENOISER_SIZES), default="B")
    ap.add_argument("--arch", choices=ARCHS, default="uvit")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--sampler", choices=["ddim", "dpm++"], default="ddim")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--out", default=None, help="JSON path (default bench/results/sample_throughput_<device>.json)"
    )
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    row = measure(args, device)
    result = {
        "benchmark": "sample_throughput",
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.machine()})",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": [row],
    }
    print(f"{'engine':<10}{'images/s':>12}{'s/batch':>10}{'fwd ms':>10}")
    print(
        f"{row['engine']:<10}{row['images_per_s']:>12}{row['seconds_per_batch']:>10}{row['forward_ms']:>10}"
    )
    out = Path(args.out or f"bench/results/sample_throughput_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
