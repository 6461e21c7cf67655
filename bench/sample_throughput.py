"""Sampling throughput: images/s of guided sampling through each engine, against eager in the same run.

    python bench/sample_throughput.py                          # GPU: ViT-B/4 U-ViT at 112x112, batch 64
    python bench/sample_throughput.py --size tiny --batch 8    # the CPU-sized run (< 5 minutes on 2 cores)

For every available engine x sampler (DDIM-100, DPM-Solver++-20, DPM-Solver++-15 at logSNR spacing)
x precision: images/s, latency per step, peak memory (CUDA: allocated and reserved, the latter holding
CUDA graph pools), speed-up over the baseline (eager bf16 on a
GPU, eager fp32 on a CPU) with the same sampler, and the drift of its images from the baseline's
(same seeds: mean and max |difference| in uint8 levels). An engine named "NAME+triton" runs the
denoiser with the Triton attention and AdaLN kernels (kernels/) instead of SDPA and the PyTorch
LayerNorm; "NAME+fast" also runs the MLP's first Linear + GELU as one cuBLASLt GEMM (mlp="cublaslt",
CUDA only). The compile engine takes the attention and MLP choices only (Inductor fuses the
LayerNorm steps itself). On a GPU the run also measures the bf16 matmul rate and reports each row
against the compute floor (forward FLOPs x 2 for CFG x steps at that rate; DESIGN.md's performance
model). Engines that cannot start here get a row saying why; GPU-only figures are "pending" on a CPU
run. Weights are random (a forward's cost does not depend on them) but non-zero, so numbers flow as
in a trained model. Every step runs one batched forward of 2 x batch rows (conditional +
unconditional), as generation does. The first call of each (engine, sampler) is timed apart as
"warmup_s" (compilation, graph capture, export). Prints a table and writes JSON with device,
versions and config to bench/results/."""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from pathlib import Path

import torch

from vigface.choices import SAMPLERS
from vigface.cli.common import positive_int
from vigface.diffusion.denoiser import Denoiser
from vigface.diffusion.denoiser_config import ARCHS, DENOISER_SIZES, DenoiserConfig
from vigface.diffusion.schedule import NoiseSchedule
from vigface.engines import create_engine
from vigface.engines.base import FAST_BACKENDS, denoiser_with
from vigface.engines.compile import compile_options
from vigface.errors import VigfaceError

GPU_ONLY = ("cudagraph", "trt")
# NAME+VARIANT: the denoiser's fast paths (same weights) that the engine runs
KERNEL_VARIANTS = {
    "triton": {"attention": "triton", "adaln": "triton"},
    "fast": FAST_BACKENDS,
}
DEFAULT_PRECISIONS = {
    "cuda": {"eager": "bf16", "compile": "bf16,fp8", "cudagraph": "bf16", "onnx": "fp32", "trt": "bf16"},
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
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()  # reserved memory then holds this engine's pools, not earlier ones'
            self.live_at_start = torch.cuda.memory_allocated(self.device)
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
            self.peak_reserved = torch.cuda.max_memory_reserved(self.device)
        else:
            self._stop.set()
            self._thread.join()

    @property
    def gib(self) -> float:
        return round(self.peak / 2**30, 3)


def make_model(args, device) -> Denoiser:
    torch.manual_seed(0)
    model = Denoiser(model_config(args)).to(device).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.02)
    return model


def model_config(args, **changes) -> DenoiserConfig:
    overrides = {"arch": args.arch, **changes}
    if args.image_size:
        overrides["image_size"] = args.image_size
    return DenoiserConfig.preset(args.size, **overrides)


def forward_flops(args) -> int:
    """FLOPs of one denoiser forward for one image (torch's FlopCounterMode on the reference ops).

    Attention runs on SDPA's math backend here: the counter has no rule for the CPU flash kernel
    SDPA otherwise picks, and counted attention as nothing (the floors of the GPU results before
    the nineteenth session, 155.7 GFLOP per ViT-B/4 image instead of 180.2)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = Denoiser(model_config(args)).eval()
    s = model.config.image_size
    x, t = torch.randn(1, 3, s, s), torch.tensor([500])
    cond, pose = torch.randn(1, model.config.cond_dim), torch.rand(1, 5, s, s)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, cond, pose)
    return int(counter.get_total_flops())


def matmul_tflops(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """Measured bf16 matmul rate (random data; median of `repeats` timed with CUDA events)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e12


def parse_samplers(text: str) -> list[tuple[str, int]]:
    """ "ddim:100,dpm++:20" -> [("ddim", 100), ("dpm++", 20)]; ValueError names a bad item."""
    out = []
    for item in text.split(","):
        name, _, steps = item.partition(":")
        if name not in SAMPLERS or not steps.isdigit() or not 1 <= int(steps) <= 1000:
            raise ValueError(
                f"{item!r}: expected NAME:STEPS with NAME one of {', '.join(SAMPLERS)} and 1..1000 steps"
            )
        out.append((name, int(steps)))
    return out


def check_args(ap: argparse.ArgumentParser, args, device: torch.device) -> None:
    """One argparse error for what used to end in a KeyError, ValueError or ZeroDivisionError deep
    inside the run, or in a baseline that matched no row (no speed-up columns, no word)."""
    try:
        parse_samplers(args.samplers)
    except ValueError as err:
        ap.error(f"--samplers {err}")
    labels = args.engines.split(",")
    for label in labels:
        name, _, kernels = label.partition("+")
        if name not in DEFAULT_PRECISIONS[device.type]:
            ap.error(f"--engines {label!r}: choose among {', '.join(DEFAULT_PRECISIONS[device.type])}")
    engine, _, precision = args.baseline.partition(":")
    if engine in labels:
        offered = (args.precisions or DEFAULT_PRECISIONS[device.type][engine.partition("+")[0]]).split(",")
        if precision not in offered and args.baseline_given:
            ap.error(f"--baseline {args.baseline!r}: {engine} runs {', '.join(offered)} here")
        # the baseline runs first, so every other row gets its speed-up and drift (a row measured
        # before it had none)
        args.engines = ",".join([engine] + [label for label in labels if label != engine])
    elif args.baseline_given:  # a default baseline not measured leaves the columns out, as before
        ap.error(f"--baseline {args.baseline!r}: its engine is not among --engines {args.engines}")


def to_uint8(x0: torch.Tensor) -> torch.Tensor:
    return ((x0.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def run_engine(engine, inputs, sampler, steps, args, device, sync) -> tuple[dict, torch.Tensor]:
    cond, pose, w, noises = inputs
    # an fp8 engine still to calibrate runs its first call uncompiled: it compiles on the second
    warmups = 2 if getattr(engine, "needs_calibration", False) else 1
    t0 = time.perf_counter()
    for _ in range(warmups):
        engine.sample(cond, pose, w, sampler=sampler, steps=steps, x_T=noises[0])
    sync()
    warmup = time.perf_counter() - t0
    with PeakMemory(device) as memory:
        t0 = time.perf_counter()
        for r in range(args.repeats):
            images = engine.sample(cond, pose, w, sampler=sampler, steps=steps, x_T=noises[1 + r])
            if r == 0:
                # drift is measured on a call after the warm-up, which may differ from the later
                # ones (the compile engine's fp8 calibration call runs uncompiled)
                after_warmup = images.clone()  # an engine may return a buffer it reuses
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
    if device.type == "cuda":
        # A CUDA graph's activations live in its private pool, reserved but never allocated by a
        # replay: for graph engines the reserved peak is the one to read. Both include what was
        # already live (the models of this run, earlier kernel variants): live_at_start_gib.
        row["peak_reserved_gib"] = round(memory.peak_reserved / 2**30, 3)
        row["live_at_start_gib"] = round(memory.live_at_start / 2**30, 3)
    return row, to_uint8(after_warmup)


def measure(args, device: torch.device, floor: dict | None, rows: list, saved=lambda: None) -> list[dict]:
    """Append one row per engine x precision x sampler to `rows`, calling `saved()` after each (a run
    cut short by a time limit keeps the rows it finished)."""
    model = make_model(args, device)
    models = {"": model}
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
    baseline = {}
    for label in args.engines.split(","):
        name, _, kernels = label.partition("+")
        precisions = (args.precisions or defaults[name]).split(",")
        # the baseline's precision first, so the engine's other rows get a speed-up too
        precisions.sort(key=lambda p: f"{label}:{p}" != args.baseline)
        for precision in precisions:
            base = {"engine": label, "precision": precision}
            if name in GPU_ONLY and device.type != "cuda":
                rows.append({**base, "status": "pending: needs a GPU (no figures on a CPU run)"})
                saved()
                print(format_row(rows[-1]), flush=True)
                continue
            options = {"plan": args.trt_plan} if name == "trt" else {}
            if name == "compile" and args.compile_mode:
                options["mode"] = args.compile_mode
            try:
                if kernels and kernels not in KERNEL_VARIANTS:
                    raise VigfaceError(f"engine {label!r}: the variants are {', '.join(KERNEL_VARIANTS)}")
                if kernels and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                    raise VigfaceError(
                        "the Triton kernels need CUDA (or TRITON_INTERPRET=1: the interpreter)"
                    )
                if "mlp" in KERNEL_VARIANTS.get(kernels, {}) and device.type != "cuda":
                    raise VigfaceError("the cuBLASLt GELU epilogue (mlp='cublaslt') needs CUDA")
                model_kernels = kernels
                if name == "compile" and kernels:
                    # Inductor fuses the LayerNorm + modulate steps itself: the other kernels enter
                    # its graph as engine options, on the plain model
                    options.update(compile_options(KERNEL_VARIANTS[kernels]))
                    model_kernels = ""
                if model_kernels and model_kernels not in models:
                    models[model_kernels] = denoiser_with(model, **KERNEL_VARIANTS[model_kernels])
                t0 = time.perf_counter()
                engine = create_engine(name, models[model_kernels], schedule, device, precision, **options)
                base["engine_options"] = engine.describe()
                setup = time.perf_counter() - t0
            except VigfaceError as exc:
                rows.append({**base, "status": f"unavailable: {exc}"})
                saved()
                print(format_row(rows[-1]), flush=True)
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
                if f"{label}:{precision}" == args.baseline:
                    baseline[key] = (row["images_per_s"], images)
                if floor:
                    row["ratio_to_floor"] = round(row["images_per_s"] / floor_images_per_s(floor, steps), 3)
                if key in baseline:
                    ips, ref = baseline[key]
                    diff = (images.int() - ref.int()).abs().float()
                    row["speedup_vs_baseline"] = round(row["images_per_s"] / ips, 3)
                    row["drift_vs_eager_uint8"] = {
                        "mean": round(diff.mean().item(), 4),
                        "max": int(diff.max()),
                    }
                rows.append(row)
                saved()
                print(format_row(row), flush=True)
            del engine
    return rows


def floor_images_per_s(floor: dict, steps: int) -> float:
    """Images/s if every step's FLOPs (2 forwards: CFG) ran at the measured matmul rate."""
    return floor["matmul_tflops"] * 1e12 / (2 * floor["forward_flops_per_image"] * steps)


HEADER = (
    f"{'engine':<18}{'prec':<6}{'sampler':<16}{'img/s':>9}{'ms/step':>10}{'x base':>9}{'peak GiB':>10}"
    f"{'drift':>8}"
)


def format_row(row: dict) -> str:
    if row.get("status") != "ok":
        return f"{row['engine']:<18}{row['precision']:<6}{row['status'][:90]}"
    drift = row.get("drift_vs_eager_uint8", {}).get("mean", "")
    return (f"{row['engine']:<18}{row['precision']:<6}{row['sampler'] + '-' + str(row['steps']):<16}"
            f"{row['images_per_s']:>9}{row['ms_per_step']:>10}{row.get('speedup_vs_baseline', ''):>9}"
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
    ap.add_argument(
        "--engines",
        default="eager,compile,cudagraph,onnx,trt",
        help="names, NAME+triton for the Triton kernels",
    )
    ap.add_argument(
        "--baseline", default=None, help="ENGINE:PRECISION (default eager:bf16 on GPU, eager:fp32 on CPU)"
    )
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (default: the engine's)")
    ap.add_argument("--samplers", default="ddim:100,dpm++:20,dpm++logsnr:15", help="name:steps,...")
    ap.add_argument("--precisions", default=None, help="for every engine (default: per engine and device)")
    ap.add_argument("--batch", type=positive_int, default=64)
    ap.add_argument("--repeats", type=positive_int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--trt-plan", default=None, help="a vigface-export --format trt plan for the trt rows")
    ap.add_argument(
        "--out", default=None, help="JSON path (default bench/results/sample_throughput_<device>.json)"
    )
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.baseline_given = args.baseline is not None
    if args.baseline is None:
        args.baseline = "eager:bf16" if device.type == "cuda" else "eager:fp32"
    check_args(ap, args, device)
    del args.baseline_given  # (not a setting of the results)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    floor = None
    if device.type == "cuda":
        floor = {
            "forward_flops_per_image": forward_flops(args),
            "matmul_tflops": round(matmul_tflops(device), 1),
        }
        floor["images_per_s"] = {
            f"{name}-{steps}": round(floor_images_per_s(floor, steps), 2)
            for name, steps in parse_samplers(args.samplers)
        }
        print(f"floor: {floor}", flush=True)
    rows: list = []
    config = model_config(args)
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
        "baseline": args.baseline,
        "compute_floor": floor
        or "GPU only: forward FLOPs x 2 (CFG) x steps at the measured bf16 matmul rate",
        "total_seconds": None,
        "rows": rows,
    }
    out = Path(args.out or f"bench/results/sample_throughput_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def saved(done: bool = False) -> None:
        result["total_seconds"] = round(time.perf_counter() - t0, 1)
        result["complete"] = done
        result["load_average"][1] = round(os.getloadavg()[0], 2)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(out)

    print(HEADER)
    measure(args, device, floor, rows, saved)
    saved(done=True)
    print(f"{result['total_seconds']} s -> {out}")


if __name__ == "__main__":
    main()
