"""Sampling throughput: images/s of guided sampling through each engine, against eager in the same run.

    python bench/sample_throughput.py                          # GPU: ViT-B/4 U-ViT at 112x112, batch 64
    python bench/sample_throughput.py --size tiny --batch 8    # the CPU-sized run (< 5 minutes on 2 cores)

For every available engine x sampler (DDIM-100, DPM-Solver++-20) x precision: images/s, latency
per step, peak memory, speed-up over eager fp32 with the same sampler, and the drift of its images
from eager's (same seeds: mean and max |difference| in uint8 levels). Engines that cannot start
here get a row saying why; GPU-only figures are "pending" on a CPU run. Weights are random (a
forward's cost does not depend on them) but non-zero, so numbers flow as in a trained model. Every
step runs one batched forward of 2 x batch rows (conditional + unconditional), as generation does.
The first call of each (engine, sampler) is timed apart as "warmup_s" (compilation, graph capture,
export). Prints a table and writes JSON with device, versions and config to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from pathlib import Path

import torch

from vigface.diffusion.denoiser import ARCHS, DENOISER_SIZES, Denoiser, DenoiserConfig
from vigface.diffusion.schedule import NoiseSchedule
from vigface.engines import create_engine
from vigface.errors import VigfaceError

GPU_ONLY = ("cudagraph", "trt")
DEFAULT_PRECISIONS = {
    "cuda": {"eager": "fp32,bf16", "compile": "bf16,fp8", "cudagraph": "bf16", "onnx": "fp32", "trt": "bf16"},
    "cpu": {"eager": "fp32", "compile": "fp32", "cudagraph": "bf16", "onnx": "fp32", "trt": "bf16"},
}


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak on GPU; on CPU the peak resident set size above
    the level at entry, sampled every 10 ms (a process-wide measure: close to the engine's own)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._base, self._stop = self._rss(), threading.Event()

        def watch():
            while not self._stop.wait(0.01):
                self.peak = max(self.peak, self._rss() - self._base)

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()

    @property
    def gib(self) -> float:
        return round(self.peak / 2**30, 3)


def make_model(args, device) -> Denoiser:
    torch.manual_seed(0)
    overrides = {"arch": args.arch}
    if args.image_size:
        overrides["image_size"] = args.image_size
    model = Denoiser(DenoiserConfig.preset(args.size, **overrides)).to(device).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.02)
    return model


def parse_samplers(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.split(","):
        name, _, steps = item.partition(":")
        out.append((name, int(steps)))
    return out


def to_uint8(x0: torch.Tensor) -> torch.Tensor:
    return ((x0.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def run_engine(engine, inputs, sampler, steps, args, device, sync) -> tuple[dict, torch.Tensor]:
    cond, pose, w, noises = inputs
    t0 = time.perf_counter()
    first = engine.sample(cond, pose, w, sampler=sampler, steps=steps, x_T=noises[0])
    sync()
    warmup = time.perf_counter() - t0
    with PeakMemory(device) as memory:
        t0 = time.perf_counter()
        for r in range(args.repeats):
            engine.sample(cond, pose, w, sampler=sampler, steps=steps, x_T=noises[1 + r])
        sync()
        seconds = (time.perf_counter() - t0) / args.repeats
    row = {
        "images_per_s": round(args.batch / seconds, 3),
        "seconds_per_batch": round(seconds, 4),
        "ms_per_step": round(1000 * seconds / steps, 3),
        "warmup_s": round(warmup, 2),
        "peak_memory_gib": memory.gib,
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "cpu_rss_above_start",
    }
    return row, to_uint8(first)


def measure(args, device: torch.device) -> list[dict]:
    model = make_model(args, device)
    schedule = NoiseSchedule("cosine", 1000)
    n, s = args.batch, model.config.image_size
    g = torch.Generator().manual_seed(0)
    cond = torch.nn.functional.normalize(torch.randn(n, model.config.cond_dim, generator=g), dim=1).to(device)
    pose = torch.rand(n, 5, s, s, generator=g).to(device)
    w = torch.full((n,), 2.5, device=device)
    noises = [torch.randn(n, 3, s, s, generator=g).to(device) for _ in range(args.repeats + 1)]
    inputs = (cond, pose, w, noises)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    defaults = DEFAULT_PRECISIONS[device.type]
    rows, baseline = [], {}
    for name in args.engines.split(","):
        precisions = (args.precisions or defaults[name]).split(",")
        for precision in precisions:
            base = {"engine": name, "precision": precision}
            if name in GPU_ONLY and device.type != "cuda":
                rows.append({**base, "status": "pending: needs a GPU (no figures on a CPU run)"})
                continue
            options = {"plan": args.trt_plan} if name == "trt" else {}
            try:
                t0 = time.perf_counter()
                engine = create_engine(name, model, schedule, device, precision, **options)
                setup = time.perf_counter() - t0
            except VigfaceError as exc:
                rows.append({**base, "status": f"unavailable: {exc}"})
                continue
            for sampler, steps in parse_samplers(args.samplers):
                row, images = run_engine(engine, inputs, sampler, steps, args, device, sync)
                row = {
                    **base,
                    "sampler": sampler,
                    "steps": steps,
                    "status": "ok",
                    "setup_s": round(setup, 2),
                    **row,
                }
                key = (sampler, steps)
                if name == "eager" and precision == "fp32":
                    baseline[key] = (row["images_per_s"], images)
                if key in baseline:
                    ips, ref = baseline[key]
                    diff = (images.int() - ref.int()).abs().float()
                    row["speedup_vs_eager_fp32"] = round(row["images_per_s"] / ips, 3)
                    row["drift_vs_eager_uint8"] = {
                        "mean": round(diff.mean().item(), 4),
                        "max": int(diff.max()),
                    }
                rows.append(row)
                print(format_row(row), flush=True)
            del engine
    return rows


HEADER = (
    f"{'engine':<10}{'prec':<6}{'sampler':<11}{'img/s':>9}{'ms/step':>10}{'x eager':>9}{'peak GiB':>10}"
    f"{'drift':>8}"
)


def format_row(row: dict) -> str:
    if row.get("status") != "ok":
        return f"{row['engine']:<10}{row['precision']:<6}{row['status'][:90]}"
    drift = row.get("drift_vs_eager_uint8", {}).get("mean", "")
    return (f"{row['engine']:<10}{row['precision']:<6}{row['sampler'] + '-' + str(row['steps']):<11}"
            f"{row['images_per_s']:>9}{row['ms_per_step']:>10}{row.get('speedup_vs_eager_fp32', ''):>9}"
            f"{row['peak_memory_gib']:>10}{drift:>8}")  # fmt: skip


def versions() -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for module in ("onnxruntime", "onnx", "onnxscript", "tensorrt", "triton"):
        try:
            out[module] = __import__(module).__version__
        except ImportError:
            out[module] = None
    try:
        from vigface import _C

        out["vigface_C"] = {"cuda": _C.has_cuda, "cuda_archs": _C.build_info["cuda_archs"]}
    except ImportError:
        out["vigface_C"] = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=tuple(DENOISER_SIZES), default="B")
    ap.add_argument("--arch", choices=ARCHS, default="uvit")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--engines", default="eager,compile,cudagraph,onnx,trt")
    ap.add_argument("--samplers", default="ddim:100,dpm++:20", help="name:steps,...")
    ap.add_argument("--precisions", default=None, help="for every engine (default: per engine and device)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--trt-plan", default=None, help="a vigface-export --format trt plan for the trt rows")
    ap.add_argument(
        "--out", default=None, help="JSON path (default bench/results/sample_throughput_<device>.json)"
    )
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    print(HEADER)
    rows = measure(args, device)
    config = DenoiserConfig.preset(
        args.size, arch=args.arch, **({"image_size": args.image_size} if args.image_size else {})
    )
    result = {
        "benchmark": "sample_throughput",
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "denoiser": {**config.to_dict(), "tokens": config.tokens},
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.machine()})",
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # the 1-minute load average before and after: the CPU machine is shared, so it says how
        # much of it this run had
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "versions": versions(),
        "gpu_figures": "measured"
        if device.type == "cuda"
        else "pending (CPU run: cudagraph/trt and GPU speed-ups not measured)",
        "total_seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    out = Path(args.out or f"bench/results/sample_throughput_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['total_seconds']} s -> {out}")


if __name__ == "__main__":
    main()
