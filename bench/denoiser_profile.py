"""Where a denoiser forward's time goes: its GEMMs, its attention and the rest, apart and together.

    python bench/denoiser_profile.py                        # GPU: ViT-B/4 U-ViT, 128 rows (64 + CFG), bf16
    python bench/denoiser_profile.py --size tiny --rows 4   # a CPU dry run of the same code, fp32

1. gemms: every linear shape of the forward (rows x tokens input rows) timed alone, its TFLOP/s, and
   the sum over the forward's linears: what the forward costs if everything else were free.
2. attention at (rows, heads, tokens, head_dim) on the denoiser's packed q, k, v views: SDPA as
   torch picks, SDPA forced to each of its kernels (flash, cuDNN, memory-efficient), the Triton kernel.
3. forwards (VARIANTS): eager (SDPA + PyTorch LayerNorm), eager with cuDNN SDPA, with the Triton
   attention/AdaLN kernels, with those and the cuBLASLt GELU epilogue ("fast"); compile (Inductor)
   with each attention, with the fast paths, and in fp8 (static scales) with the Triton attention
   (the MLP's GELU + quantisation a separate pass) or the fast paths (the fused fp8 GELU GEMM).
4. the kernels of one forward of a few variants (torch.profiler): device time by kernel name and by
   kind (GEMM, attention, the rest).
Times are medians of CUDA-event-timed calls after warm-up. Writes JSON (default
bench/results/denoiser_profile_<device>.json), saved after each part.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vigface.diffusion.attention import attention
from vigface.diffusion.denoiser import Denoiser
from vigface.diffusion.denoiser_config import DENOISER_SIZES, DenoiserConfig
from vigface.diffusion.schedule import NoiseSchedule
from vigface.engines.base import FAST_BACKENDS, denoiser_with
from vigface.engines.compile import CompileEngine, compile_options

# kernel names: cuBLAS (sm90_xmma_gemm_*, nvjet_*, cutlass_*), Inductor GEMM templates (triton_tem_*);
# FlashAttention-2 (flash_fwd_*), cuDNN SDPA, memory-efficient (fmha_*), ours (_fwd_kernel)
GEMM_KERNEL = re.compile(r"gemm|nvjet|xmma|cutlass|matmul|sm90_|cublas|triton_tem", re.I)
ATTENTION_KERNEL = re.compile(r"flash|fmha|attention|attn|cudnn|sdpa|^_fwd_kernel", re.I)


def timed(fn, device: torch.device, warmup: int = 3, repeats: int = 10) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def sdpa_backend(name: str):
    """A context forcing SDPA onto one kernel ("default": torch's own choice)."""
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kinds = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }
    return sdpa_kernel([kinds[name]])


def model_inputs(config: DenoiserConfig, rows: int, device, dtype):
    g, s = torch.Generator().manual_seed(0), config.image_size
    x = torch.randn(rows, 3, s, s, generator=g)
    t = torch.randint(0, 1000, (rows,), generator=g)
    cond = torch.randn(rows, config.cond_dim, generator=g)
    pose = torch.rand(rows, 5, s, s, generator=g)
    return x.to(device, dtype), t.to(device), cond.to(device, dtype), pose.to(device, dtype)


def gemm_part(model: Denoiser, rows: int, device, dtype) -> dict:
    tokens = model.config.tokens
    shapes: dict[tuple[int, int, int], int] = {}
    for name, layer in model.named_modules():
        if isinstance(layer, torch.nn.Linear):
            per_token = not (name.startswith(("time_mlp", "cond_proj", "final_ada")) or ".ada." in name)
            key = (rows * tokens if per_token else rows, layer.in_features, layer.out_features)
            shapes[key] = shapes.get(key, 0) + 1
    out, total = [], 0.0
    for (m, k, n), count in sorted(shapes.items(), key=lambda item: -item[0][0] * item[0][1] * item[0][2]):
        x = torch.randn(m, k, device=device, dtype=dtype)
        w, b = torch.randn(n, k, device=device, dtype=dtype), torch.randn(n, device=device, dtype=dtype)
        seconds = timed(lambda x=x, w=w, b=b: F.linear(x, w, b), device)
        total += count * seconds
        out.append({"m": m, "k": k, "n": n, "per_forward": count, "ms": round(1000 * seconds, 4),
                    "tflops": round(2 * m * k * n / seconds / 1e12, 1)})  # fmt: skip
    result = {"shapes": out, "sum_ms_per_forward": round(1000 * total, 3)}
    if device.type == "cuda":
        a, b = (torch.randn(8192, 8192, device=device, dtype=dtype) for _ in range(2))
        result["matmul_8192_tflops"] = round(2 * 8192**3 / timed(lambda: a @ b, device) / 1e12, 1)
    return result


def attention_part(config: DenoiserConfig, rows: int, device, dtype, layers: int) -> list[dict]:
    heads, tokens, head_dim = config.heads, config.tokens, config.width // config.heads
    packed = torch.randn(rows, tokens, 3, heads, head_dim, device=device, dtype=dtype)
    q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)
    flops = 4 * rows * heads * tokens * tokens * head_dim
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    variants = [("sdpa", "default"), ("sdpa", "flash"), ("sdpa", "cudnn"), ("sdpa", "efficient")]
    variants += [("triton", "default")] if device.type == "cuda" else []
    out = []
    for backend, kernel in variants:
        label = backend if kernel == "default" else f"{backend}:{kernel}"
        try:
            with sdpa_backend(kernel):
                err = (attention(q, k, v, backend).float() - ref).abs().max().item()
                seconds = timed(lambda backend=backend: attention(q, k, v, backend), device)
        except Exception as exc:  # a kernel this GPU / torch cannot run: say so, keep going
            out.append({"attention": label, "status": f"unavailable: {str(exc).splitlines()[0][:200]}"})
            continue
        out.append({"attention": label, "ms": round(1000 * seconds, 4),
                    "tflops": round(flops / seconds / 1e12, 1),
                    "ms_per_forward": round(1000 * seconds * layers, 3), "max_error": err})  # fmt: skip
    return out


VARIANTS = {  # label: (config changes, how it runs, SDPA kernel)
    "eager": ({}, "eager", "default"),
    "eager+cudnn": ({}, "eager", "cudnn"),
    "eager+triton": ({"attention": "triton", "adaln": "triton"}, "eager", "default"),
    "eager+fast": (FAST_BACKENDS, "eager", "default"),
    "compile": ({}, "compile", "default"),
    "compile+cudnn": ({}, "compile", "cudnn"),
    "compile+triton": ({"attention": "triton"}, "compile", "default"),
    # Inductor fuses the LayerNorm steps itself: attention and the GELU epilogue only
    "compile+fast": (FAST_BACKENDS, "compile", "default"),
    # the compile engine's fp8 (static scales, calibrated on one dynamic call first); with the fast
    # kernels its MLPs run the fused fp8 GELU GEMM, without them _scaled_mm + a GELU/quantise pass
    "compile+triton:fp8": ({"attention": "triton"}, "compile-fp8", "default"),
    "compile+fast:fp8": (FAST_BACKENDS, "compile-fp8", "default"),
}
CPU_VARIANTS = ("eager", "compile")


def forward_fn(model: Denoiser, changes: dict, how: str, inputs):
    """A no-argument callable running one forward of the variant; compiled ones through the compile
    engine (mode "default"), which takes the attention / MLP choices and leaves the LayerNorms to Inductor."""
    if how == "eager":
        variant = denoiser_with(model, **changes)
        return lambda: variant(*inputs)
    precision = "fp8" if how == "compile-fp8" else "bf16" if inputs[0].dtype == torch.bfloat16 else "fp32"
    engine = CompileEngine(model, NoiseSchedule("cosine", 1000), inputs[0].device, precision, mode="default",
                           **compile_options(changes))  # fmt: skip
    if engine.needs_calibration:
        engine.denoise(*inputs)  # the fp8 calibration call, uncompiled
    return lambda: engine.compiled(*inputs)


def kernel_table(fn, device, top: int) -> dict:
    """Device time of one call by kernel name (the top ones) and by kind."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    kernels = []
    for event in prof.key_averages():
        is_kernel = str(getattr(event, "device_type", "")).endswith("CUDA")
        us = getattr(event, "self_device_time_total", None)
        if us is None:
            us = getattr(event, "self_cuda_time_total", 0)
        if device.type == "cuda" and is_kernel and us > 0:
            kernels.append((event.key, us, event.count))
    kernels.sort(key=lambda k: -k[1])
    if device.type == "cuda" and not kernels:  # this torch's profiler names things otherwise: keep its table
        return {"table": prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=top)}
    kinds = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    for name, us, _ in kernels:
        if ATTENTION_KERNEL.search(name):
            kinds["attention"] += us / 1000
        else:
            kinds["gemm" if GEMM_KERNEL.search(name) else "other"] += us / 1000
    return {
        "total_ms": round(sum(us for _, us, _ in kernels) / 1000, 3),
        "ms_by_kind": {k: round(v, 3) for k, v in kinds.items()},
        "kernel_count": sum(c for _, _, c in kernels),
        "top": [
            {"kernel": name[:160], "ms": round(us / 1000, 3), "calls": c} for name, us, c in kernels[:top]
        ],
    }


def forward_part(model: Denoiser, rows: int, device, dtype, labels, profiled, top: int, out: list, saved):
    """Appends one row per forward variant to `out`, calling `saved()` after each."""
    inputs = model_inputs(model.config, rows, device, dtype)
    for label in labels:
        changes, how, kernel = VARIANTS[label]
        try:
            with torch.no_grad(), sdpa_backend(kernel):
                t0 = time.perf_counter()
                fn = forward_fn(model, changes, how, inputs)
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                first = time.perf_counter() - t0
                seconds = timed(fn, device)
                row = {"forward": label, "ms": round(1000 * seconds, 3), "first_call_s": round(first, 2)}
                if label in profiled:
                    row["kernels"] = kernel_table(fn, device, top)
        except Exception as exc:
            row = {"forward": label, "status": f"unavailable: {str(exc).splitlines()[0][:200]}"}
        out.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "kernels"}), flush=True)
        if "kernels" in row and "table" in row["kernels"]:
            print(row["kernels"]["table"])
        elif "kernels" in row:
            print(f"  by kind (ms): {row['kernels']['ms_by_kind']}, {row['kernels']['kernel_count']} kernels")
            for k in row["kernels"]["top"][:12]:
                print(f"  {k['ms']:9.3f} ms {k['calls']:5d}x  {k['kernel'][:110]}")
        saved()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=tuple(DENOISER_SIZES), default="B")
    ap.add_argument("--rows", type=int, default=128, help="forward batch: 2 x the sampling batch (CFG)")
    ap.add_argument("--forwards", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--profile", default="eager,eager+fast,compile+fast,compile+fast:fp8",
                    help="forwards whose kernels are listed")  # fmt: skip
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    labels = args.forwards.split(",")
    unknown = [label for label in labels if label not in VARIANTS]
    if unknown:
        ap.error(f"--forwards: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = Denoiser(DenoiserConfig.preset(args.size)).to(device, dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.02)  # non-zero AdaLN / output weights, as in a trained model
    config = model.config
    result = {
        "benchmark": "denoiser_profile",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.machine()})",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "dtype": str(dtype),
        "rows": args.rows,
        "denoiser": {**config.to_dict(), "tokens": config.tokens},
    }
    out = Path(args.out or f"bench/results/denoiser_profile_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def saved() -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(out)

    result["gemms"] = gemm_part(model, args.rows, device, dtype)
    print(json.dumps(result["gemms"]), flush=True)
    saved()
    result["attention"] = attention_part(config, args.rows, device, dtype, config.depth)
    for row in result["attention"]:
        print(json.dumps(row), flush=True)
    saved()
    result["forwards"] = []
    profiled = set(args.profile.split(","))
    if device.type != "cuda":
        labels = [label for label in labels if label in CPU_VARIANTS]
    forward_part(model, args.rows, device, dtype, labels, profiled, args.top, result["forwards"], saved)
    saved()
    print(f"-> {out}")


if __name__ == "__main__":
    main()
