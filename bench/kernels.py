"""Kernel benchmark: Triton flash attention and fused AdaLN vs eager PyTorch, every SDPA backend, flash-attn.

    python bench/kernels.py          # GPU: batch 64, 784 tokens, 12 heads x head dim 64 (width 768), bf16
    python bench/kernels.py          # CPU: a reduced fp32 shape, kernels in Triton's interpreter

Attention rows: the textbook formula in eager PyTorch (holds the L x L matrix), torch's
scaled_dot_product_attention with its own choice and with each backend forced (math, efficient,
flash, cudnn; a backend that refuses the shape or device is listed as unavailable), flash-attn-4
(`flash_attn.cute`) when importable, and the Triton kernel. Forward and forward + backward;
TFLOP/s from the nominal 4 N H L^2 D FLOPs of the forward (2.5x that for the backward).
AdaLN rows: eager `LayerNorm(x) (1 + scale) + shift` and `x + gate y` then the same, vs the fused
kernels; TB/s from the bytes each op must move at least (x, y read once; x', h written once).
Every row also reports its max |error| against the eager result, so a fast wrong kernel shows.

On a CPU the Triton rows run in the interpreter (serial NumPy, ~1000x slower than a GPU): their
times only show that the harness works. GPU figures are marked pending in the CPU JSON.
Writes JSON to bench/results/kernels_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # must precede the kernels' import (triton.jit reads it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from vigface.kernels import adaln, flash_attention  # noqa: E402

from vigface.diffusion.attention import attention  # noqa: E402

SDPA_BACKENDS = {
    "sdpa-math": SDPBackend.MATH,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def timed(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds per call; on a GPU through CUDA events (triton.testing.do_bench)."""
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=25 * warmup, rep=100 * repeats, return_mode="median") / 1e3
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def sig(x: float) -> float:
    """4 significant digits: CPU-sized rates are tiny, GPU ones large."""
    return float(f"{x:.4g}")


def max_err(a, b) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


def attention_impls(device: torch.device) -> dict:
    impls = {"eager": flash_attention.flash_attention_ref, "sdpa-auto": F.scaled_dot_product_attention}
    for name, backend in SDPA_BACKENDS.items():

        def forced(q, k, v, backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)

        impls[name] = forced
    impls["flash-attn-4"] = lambda q, k, v: attention(q, k, v, "flash")
    impls["triton"] = flash_attention.flash_attention
    return impls


def bench_attention(args, device, dtype) -> list[dict]:
    n, h, length, d = args.batch, args.heads, args.tokens, args.head_dim
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(n, h, length, d, generator=g).to(device, dtype) for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    fwd_flops = 4 * n * h * length * length * d
    rows = []
    expected = expected_grads = None
    for name, fn in attention_impls(device).items():
        row = {"op": "attention", "impl": name}
        try:
            with torch.no_grad():
                out = fn(q, k, v)
            grads = torch.autograd.grad(fn(*leaves), leaves, dout)
        except Exception as exc:  # a backend that refuses this device, dtype or shape
            rows.append(
                {**row, "status": f"unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
            )
            continue
        if expected is None:  # eager comes first: the reference of every later row
            expected, expected_grads = out, grads
        row["max_err_out"] = sig(max_err([out], [expected]))
        row["max_err_grads"] = sig(max_err(grads, expected_grads))

        def forward(fn=fn):
            with torch.no_grad():
                fn(q, k, v)

        def forward_backward(fn=fn):
            torch.autograd.grad(fn(*leaves), leaves, dout)

        fwd_s = timed(forward, device, args.warmup, args.repeats)
        both_s = timed(forward_backward, device, args.warmup, args.repeats)
        row.update(
            status="ok",
            fwd_ms=sig(fwd_s * 1e3),
            fwd_tflops=sig(fwd_flops / fwd_s / 1e12),
            fwd_bwd_ms=sig(both_s * 1e3),
            fwd_bwd_tflops=sig(3.5 * fwd_flops / both_s / 1e12),
        )
        rows.append(row)
    ok = {r["impl"]: r for r in rows if r["status"] == "ok"}
    best_sdpa = min(
        (r for n_, r in ok.items() if n_.startswith("sdpa")), key=lambda r: r["fwd_ms"], default=None
    )
    for r in ok.values():
        r["fwd_speedup_vs_eager"] = sig(ok["eager"]["fwd_ms"] / r["fwd_ms"])
        r["fwd_bwd_speedup_vs_eager"] = sig(ok["eager"]["fwd_bwd_ms"] / r["fwd_bwd_ms"])
        if best_sdpa is not None:
            r["fwd_speedup_vs_best_sdpa"] = sig(best_sdpa["fwd_ms"] / r["fwd_ms"])
            r["best_sdpa"] = best_sdpa["impl"]
    if device.type == "cuda" and "triton" in ok:
        ok["triton"]["tiles"] = {
            name: str(kernel.best_config)
            for name, kernel in (
                ("fwd", flash_attention._fwd),
                ("dkdv", flash_attention._dkdv),
                ("dq", flash_attention._dq),
            )
        }
    return rows


# ---------------------------------------------------------------------------------------------
# AdaLN
# ---------------------------------------------------------------------------------------------


def bench_adaln(args, device, dtype) -> list[dict]:
    n, length, width = args.batch, args.tokens, args.heads * args.head_dim
    g = torch.Generator().manual_seed(1)
    x, y, dh, dx_new = (torch.randn(n, length, width, generator=g).to(device, dtype) for _ in range(4))
    gate, shift, scale = (0.1 * torch.randn(n, width, generator=g).to(device, dtype) for _ in range(3))
    elem = x.element_size()
    tensor_bytes = n * length * width * elem
    cases = {
        # name: (eager, fused, inputs, output grads, (forward, forward + backward) bytes in units of x)
        "adaln_modulate": (adaln.adaln_modulate_ref, adaln.adaln_modulate, (x, shift, scale), (dh,), (2, 5)),
        "gated_residual_adaln": (
            adaln.gated_residual_adaln_ref,
            adaln.gated_residual_adaln,
            (x, y, gate, shift, scale),
            (dx_new, dh),
            (4, 10),
        ),
    }
    rows = []
    for op, (eager, fused, inputs, out_grads, (fwd_units, both_units)) in cases.items():
        leaves = [t.clone().requires_grad_() for t in inputs]
        expected = expected_grads = None
        for impl, fn in (("eager", eager), ("triton", fused)):
            with torch.no_grad():
                outs = fn(*inputs)
            outs = outs if isinstance(outs, tuple) else (outs,)
            grads = torch.autograd.grad(fn(*leaves), leaves, out_grads)
            if expected is None:
                expected, expected_grads = outs, grads

            def forward(fn=fn, inputs=inputs):
                with torch.no_grad():
                    fn(*inputs)

            def forward_backward(fn=fn, leaves=leaves, out_grads=out_grads):
                torch.autograd.grad(fn(*leaves), leaves, out_grads)

            fwd_s = timed(forward, device, args.warmup, args.repeats)
            both_s = timed(forward_backward, device, args.warmup, args.repeats)
            rows.append(
                {
                    "op": op,
                    "impl": impl,
                    "status": "ok",
                    "max_err_out": sig(max_err(outs, expected)),
                    "max_err_grads": sig(max_err(grads, expected_grads)),
                    "fwd_ms": sig(fwd_s * 1e3),
                    "fwd_tbps": sig(fwd_units * tensor_bytes / fwd_s / 1e12),
                    "fwd_bwd_ms": sig(both_s * 1e3),
                    "fwd_bwd_tbps": sig(both_units * tensor_bytes / both_s / 1e12),
                }
            )
        eager_row, fused_row = rows[-2], rows[-1]
        fused_row["fwd_speedup_vs_eager"] = sig(eager_row["fwd_ms"] / fused_row["fwd_ms"])
        fused_row["fwd_bwd_speedup_vs_eager"] = sig(eager_row["fwd_bwd_ms"] / fused_row["fwd_bwd_ms"])
    return rows


# ---------------------------------------------------------------------------------------------

GOALS = {"attention_fwd_vs_best_sdpa": ">= 1.1", "adaln_fwd_tbps": ">= 2.5"}


def goals(rows: list[dict]) -> dict:
    """The issue's H100 targets next to what this run measured."""
    triton_rows = {r["op"]: r for r in rows if r["impl"] == "triton" and r["status"] == "ok"}
    measured = {}
    if "attention" in triton_rows:
        measured["attention_fwd_vs_best_sdpa"] = triton_rows["attention"].get("fwd_speedup_vs_best_sdpa")
    for op in ("adaln_modulate", "gated_residual_adaln"):
        if op in triton_rows:
            measured[f"{op}_fwd_tbps"] = triton_rows[op]["fwd_tbps"]
    return {**GOALS, "measured": measured}


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64 if cuda else 1)
    ap.add_argument("--tokens", type=int, default=784 if cuda else 197)
    ap.add_argument("--heads", type=int, default=12 if cuda else 2)
    ap.add_argument("--head-dim", type=int, default=64)
    # fp32 on CPU: the interpreter's bf16 tl.dot is unsupported (triton-lang/triton#11584)
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16" if cuda else "float32")
    ap.add_argument("--warmup", type=int, default=3 if cuda else 1)
    ap.add_argument("--repeats", type=int, default=20 if cuda else 3)
    ap.add_argument("--only", choices=["attention", "adaln"], default=None)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/kernels_<device>.json)")
    args = ap.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = DTYPES[args.dtype]

    rows = []
    if args.only in (None, "attention"):
        rows += bench_attention(args, device, dtype)
    if args.only in (None, "adaln"):
        rows += bench_adaln(args, device, dtype)

    result = {
        "benchmark": "kernels",
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()})",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "triton_interpreter": flash_attention.INTERPRET,
        "load_average_1min": round(os.getloadavg()[0], 2),  # others' jobs on a shared machine skew times
        "rows": rows,
    }
    result["goals_h100"] = goals(rows) if cuda else {**GOALS, "measured": "pending (no GPU)"}
    if not cuda:
        result["gpu_figures"] = (
            "pending: no GPU was available. The Triton rows ran in the CPU interpreter, so their times "
            "only show that the harness works; eager/SDPA rows are CPU timings at this reduced shape, "
            "noisy on a shared machine (see load_average_1min)."
        )
    print(f"{'op':<22}{'impl':<16}{'fwd ms':>10}{'fwd+bwd ms':>12}{'rate fwd':>10}{'err out':>10}  status")
    for r in rows:
        rate = r.get("fwd_tflops", r.get("fwd_tbps", ""))
        print(
            f"{r['op']:<22}{r['impl']:<16}{r.get('fwd_ms', ''):>10}{r.get('fwd_bwd_ms', ''):>12}"
            f"{rate:>10}{r.get('max_err_out', ''):>10}  {r['status'][:70]}"
        )
    out = Path(args.out or f"bench/results/kernels_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
