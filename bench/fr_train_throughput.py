"""Stage-1 training throughput: samples/s of a full step, eager fp32 vs channels_last + bf16 + compile.

    python bench/fr_train_throughput.py                    # GPU: IResNet-50, batch 512, 112x112
    python bench/fr_train_throughput.py --cpu-small        # CPU: IResNet-50 at width 16, 56x56, batch 32

A step is what the trainer does: backbone forward, VIGFace head (ArcFace, real + virtual rows),
backward, gradient clipping, SGD on backbone and prototypes. Data are synthetic tensors already on
the device, so this measures compute, not decoding. Both variants run in the same process and the
JSON row records the ratio; absolute numbers mean something only on a GPU (goal on one H100:
>= 8,000 samples/s for IResNet-50 at batch 512).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from vigface.fr.backbone_config import ARCHS, BackboneConfig
from vigface.fr.iresnet import build_backbone
from vigface.fr.margin_config import MarginConfig
from vigface.fr.prototypes import VirtualPrototypeHead


def measure(args, device: torch.device, fast: bool) -> dict:
    torch.manual_seed(0)
    cfg = BackboneConfig(args.arch, 512, args.width, args.input_size)
    backbone = build_backbone(cfg).to(device)
    head = VirtualPrototypeHead(args.classes, args.virtual, 512, MarginConfig("arcface", 64.0), seed=0).to(
        device
    )
    if fast:
        backbone = backbone.to(memory_format=torch.channels_last)
    model = torch.compile(backbone) if fast else backbone
    params = [p for p in backbone.parameters() if p.requires_grad]
    opt = torch.optim.SGD([*params, head.weight], lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.rand(args.batch, 3, args.input_size, args.input_size, device=device) * 2 - 1
    if fast:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.classes, (args.batch,), device=device)

    def step(i: int) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast):
            emb = model(x)
        loss, _ = head(emb, y, i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        return loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for i in range(args.warmup):  # includes torch.compile's compilation
        step(i)
    sync()
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step(args.warmup + i)
    sync()
    seconds = time.perf_counter() - t0
    row = {
        "variant": "channels_last+bf16+compile" if fast else "eager fp32",
        "samples_per_s": round(args.batch * args.steps / seconds, 2),
        "step_ms": round(1000 * seconds / args.steps, 2),
        "warmup_s": round(warmup_s, 1),
        "final_loss": round(loss.item(), 4),
    }
    if device.type == "cuda":
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=ARCHS, default="iresnet50")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--input-size", type=int, default=112)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--classes", type=int, default=10000, help="real identities (prototype rows)")
    ap.add_argument("--virtual", type=int, default=10000, help="virtual prototypes")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--cpu-small", action="store_true", help="a CPU-sized run: width 16, 56x56, batch 32")
    ap.add_argument(
        "--out", default=None, help="JSON path (default bench/results/fr_train_throughput_<device>.json)"
    )
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.cpu_small:
        args.width, args.input_size, args.batch, args.steps, args.warmup = 16, 56, 32, 6, 2
        args.classes, args.virtual = 1000, 1000
    rows = [measure(args, device, fast=False), measure(args, device, fast=True)]
    result = {
        "benchmark": "fr_train_throughput",
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.machine()})",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "speedup": round(rows[1]["samples_per_s"] / rows[0]["samples_per_s"], 3),
    }
    print(f"{'variant':<30}{'samples/s':>12}{'step ms':>10}{'warmup s':>10}")
    for r in rows:
        print(f"{r['variant']:<30}{r['samples_per_s']:>12}{r['step_ms']:>10}{r['warmup_s']:>10}")
    print(f"speedup {result['speedup']}x on {result['device']}")
    out = Path(args.out or f"bench/results/fr_train_throughput_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
