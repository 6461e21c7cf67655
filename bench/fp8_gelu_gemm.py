"""The fused fp8 GELU GEMM against what it replaces, and its tiles, on one MLP shape.

    python bench/fp8_gelu_gemm.py --out bench/results/fp8_gelu_gemm_cuda.json      # GPU: ViT-B/4
    python bench/fp8_gelu_gemm.py --cpu                                            # the logic, interpreted

At ViT-B/4's first MLP linear (M = 128 rows x 784 tokens, K = 768, N = 3072; --shape M:K:N) it
times, in one run:
  unfused     torch._scaled_mm (bf16 out, bias in its epilogue) then GELU(tanh) / s_h -> e4m3 in eager
  compiled    the same under torch.compile (Inductor fuses the GELU and the cast into one pass): what
              the compile engine ran before the fused kernel
  scaled_mm   the GEMM alone, cuBLAS's rate for this shape
  fused       vigface.kernels.fp8_gelu_gemm autotuned, and pinned to each of its TILES and a few more
  fused tma   the same with TMA-descriptor loads and stores (tma=True)
  promoteP    the fp8 partial sums added into float32 every P K elements (cuBLAS-like precision)
and checks every output against the float32 oracle (fp8_gelu_gemm_ref): the fraction of outputs on
another e4m3 value and the largest difference. Times are medians of CUDA-event-timed calls after a
warm-up (which compiles). TFLOP/s counts 2 M N K per call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) tried on a GPU beside the kernel's own TILES
EXTRA_GPU_TILES = [(128, 256, 128, 8, 4), (128, 128, 128, 4, 4), (128, 256, 64, 8, 4), (64, 256, 128, 4, 4)]
CPU_TILES = [(16, 32, 16, 4, 1), (32, 32, 32, 4, 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--shape", default=None, help="M:K:N (default 100352:768:3072 on a GPU, 64:96:128 on CPU)"
    )
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--cpu", action="store_true", help="run in Triton's interpreter (logic only, no timings)")
    ap.add_argument(
        "--out", default=None, help="JSON path (default bench/results/fp8_gelu_gemm_<device>.json)"
    )
    args = ap.parse_args()
    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before vigface.kernels is imported
    import torch
    from denoiser_profile import timed  # the other benches' helpers (bench/ is on sys.path)
    from sample_throughput import versions
    from vigface.kernels.fp8_gelu_gemm import TILES, fp8_gelu_gemm, fp8_gelu_gemm_ref

    from vigface.engines.fp8 import quantize_e4m3, quantize_e4m3_static

    shape = args.shape or ("64:96:128" if args.cpu else "100352:768:3072")
    try:
        m, k, n = (int(v) for v in shape.split(":"))
    except ValueError:
        ap.error(f"--shape {shape!r}: expected M:K:N, e.g. 100352:768:3072")
    if min(m, k, n) < 1 or k % 16 or n % 16:
        ap.error(f"--shape {shape!r}: M >= 1 and K, N multiples of 16 (fp8 GEMM alignment)")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    device = torch.device("cpu" if args.cpu else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --cpu for the interpreted logic check")

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(m, k, generator=g) * 2).to(device, torch.bfloat16)
    w = (torch.randn(n, k, generator=g) * 0.05).to(device, torch.bfloat16)
    bias = (torch.randn(n, generator=g) * 0.1).to(device, torch.bfloat16)
    (xq, sx), (wq, sw) = quantize_e4m3(x), quantize_e4m3(w)
    hidden_scale = torch.tensor(4.0 / 448, device=device)
    out_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def unfused():
        y = torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw, bias=bias if device.type == "cuda" else None,
                             out_dtype=out_dtype)  # fmt: skip
        y = y if device.type == "cuda" else y + bias.float()
        return quantize_e4m3_static(torch.nn.functional.gelu(y, approximate="tanh"), hidden_scale)

    def scaled_mm_only():
        return torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw, bias=bias, out_dtype=out_dtype)

    operands = (xq, wq, bias, sx, sw, hidden_scale)
    oracle = fp8_gelu_gemm_ref(*operands).float()
    variants = {"unfused": unfused}
    if device.type == "cuda":
        variants["compiled"] = torch.compile(unfused, mode="default", fullgraph=True)
        variants["scaled_mm"] = scaled_mm_only
    promote = 32 if args.cpu else 64  # at most the smallest BLOCK_K among the autotuned tiles
    for tma in (False, True):
        kind = "fused tma" if tma else "fused"
        variants[kind] = lambda tma=tma: fp8_gelu_gemm(*operands, tma=tma)
        variants[f"{kind} promote{promote}"] = lambda tma=tma: fp8_gelu_gemm(
            *operands, tma=tma, promote_every=promote
        )
        for tile in CPU_TILES if args.cpu else TILES + EXTRA_GPU_TILES:
            name = f"{kind} " + "x".join(map(str, tile))
            variants[name] = lambda tile=tile, tma=tma: fp8_gelu_gemm(*operands, tiles=tile, tma=tma)

    flops = 2 * m * n * k
    result = {
        "benchmark": "fp8_gelu_gemm",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)",
        "versions": versions(),
        "shape": {"m": m, "k": k, "n": n},
        "timings": "CUDA events, median" if device.type == "cuda" else "none (interpreter: logic only)",
        "rows": [],
    }
    out = Path(args.out or f"bench/results/fp8_gelu_gemm_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, fn in variants.items():
        row: dict = {"variant": name}
        try:
            got = fn()
            if name != "scaled_mm":  # the GEMM alone has no e4m3 output to check
                row["other_e4m3_value_fraction"] = round((got.float() != oracle).float().mean().item(), 5)
                row["max_abs_difference"] = (got.float() - oracle).abs().max().item()
            if device.type == "cuda":
                ms = 1000 * timed(fn, device, repeats=args.repeats)
                row["ms"] = round(ms, 4)
                row["tflops"] = round(flops / ms / 1e9, 1)
        except Exception as exc:  # a tile this GPU cannot compile or launch: recorded, the run goes on
            row["status"] = f"failed: {str(exc).splitlines()[0][:200]}"
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(out)
    print(f"-> {out}")


if __name__ == "__main__":
    sys.exit(main())
