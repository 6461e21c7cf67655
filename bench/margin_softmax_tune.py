"""Tune the fused margin-softmax kernels' tiles on a GPU: coordinate descent from the pinned tiles.

    python bench/margin_softmax_tune.py --out bench/results/margin_softmax_tune_cuda.json
    python bench/margin_softmax_tune.py --cpu --size 48:700:64 --passes 1   # the logic, interpreted

For each fp32 dot mode ("ieee": PyTorch's default fp32 matmuls; "tf32": with
torch.backends.cuda.matmul.allow_tf32, which the kernels follow) it times one forward + backward
(ArcFace s = 64, m = 0.5, B x D rows against C prototypes, as bench/margin_softmax.py) of the
reference and of the fused kernels at that mode's pinned tiles (GPU_TUNING, GPU_TUNING_TF32), then
changes one tuning field at a time over its candidates, keeping a change when the step gets faster
(by over 2 %), for --passes rounds. Every candidate's loss
and gradients are compared with the reference of the same dot mode (a candidate that disagrees is
rejected, one that fails to compile or launch is recorded with its error), so the pick is a
checked configuration, not only a fast one. Times are medians of --repeats CUDA-event-timed steps
after a warm-up (which compiles). --deadline (shared equally by the modes) stops the search and
writes what it has.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

CANDIDATES = {
    "block_n": (32, 64, 128),
    "block_c": (64, 128, 256),
    "block_d": (32, 64, 128),
    "block_c_grad_w": (32, 64, 128),
    "block_d_grad_w": (128, 256, 512),
    "block_d_grad_e": (64, 128, 256),
    "num_warps": (4, 8),
    "programs": ("2xSM", "4xSM", "8xSM"),
}
# the interpreter (--cpu): tiles small enough to run a tiny problem through several blocks
CPU_CANDIDATES = {"block_n": (16, 32), "block_c": (32, 64), "num_warps": (4,)}
# a candidate passes when its loss and each gradient are within this of the reference's, relative
# to the reference's largest magnitude (tf32 dots round inputs to 10 mantissa bits: ~1e-3)
TOLERANCE = {"ieee": 1e-4, "tf32": 5e-3}


def make_problem(batch, classes, dim, device):
    import torch
    import torch.nn.functional as F

    g = torch.Generator(device=device).manual_seed(0)
    rows = F.normalize(torch.randn(batch, dim, generator=g, device=device), dim=1)
    weight = F.normalize(torch.randn(classes, dim, generator=g, device=device), dim=1)
    labels = torch.randint(0, classes, (batch,), generator=g, device=device)
    return rows, weight, labels


def run_step(problem, impl, tuning, margin):
    """One forward + backward: (mean loss, d rows, d weight)."""
    import vigface.kernels.margin_softmax as ms

    rows, weight, labels = (t.detach().clone().requires_grad_(t.is_floating_point()) for t in problem)
    loss = ms.margin_cross_entropy(rows, weight, labels, 64.0, margin, impl=impl, tuning=tuning).mean()
    loss.backward()
    return loss.detach(), rows.grad, weight.grad


def timed(fn, repeats, device):
    """Median seconds of `repeats` CUDA-event-timed calls after one warm-up (which compiles a new
    tuning); one call on the interpreter."""
    from denoiser_profile import timed as median_seconds  # the benchmarks' timer (bench/ is on the path)

    return median_seconds(fn, device, warmup=1, repeats=repeats if device.type == "cuda" else 1)


def relative_error(result, reference) -> float:
    pairs = zip(result, reference, strict=True)
    return max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in pairs)


def tuning_with(base, field, value, sms):
    if field == "programs":
        value = int(value.split("x")[0]) * sms
    return dataclasses.replace(base, **{field: value})


def describe(tuning) -> dict:
    return dataclasses.asdict(tuning)


def search(mode, problem, margin, base, candidates, args, device, sms, stop_at) -> dict:
    """Coordinate descent for one dot mode; returns its rows, the reference and the best tuning."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    reference = run_step(problem, "reference", None, margin)
    ref_s = timed(lambda: run_step(problem, "reference", None, margin), args.repeats, device)
    tried: dict[tuple, dict] = {}

    def evaluate(tuning) -> dict:
        key = tuple(describe(tuning).values())
        if key in tried:
            return tried[key]
        row = {"tuning": describe(tuning)}
        try:
            err = relative_error(run_step(problem, "fused", tuning, margin), reference)
            row["relative_error"] = float(f"{err:.3g}")
            if err > TOLERANCE[mode]:
                row["status"] = f"rejected: differs from the reference by {err:.3g} (> {TOLERANCE[mode]})"
            else:
                row["step_s"] = round(
                    timed(lambda: run_step(problem, "fused", tuning, margin), args.repeats, device), 6
                )
                row["status"] = "ok"
        except Exception as exc:  # out of shared memory or registers: record it, keep searching
            row["status"] = f"failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        tried[key] = row
        print(
            f"{mode:<5} {row.get('step_s', float('nan')):>9.5f} s  {row['status'][:60]:<60} {row['tuning']}",
            flush=True,
        )
        return row

    best = base
    best_row = evaluate(base)
    if best_row["status"] != "ok":
        raise SystemExit(f"{mode}: the starting tuning does not run: {best_row['status']}")
    for _ in range(args.passes):
        changed = False
        for field, values in candidates.items():
            for value in values:
                if time.perf_counter() > stop_at:
                    break
                row = evaluate(tuning_with(best, field, value, sms))
                if row["status"] == "ok" and row["step_s"] < best_row["step_s"] * 0.98:  # 2 %: beyond noise
                    best, best_row, changed = tuning_with(best, field, value, sms), row, True
        if not changed:
            break
    start_s = tried[tuple(describe(base).values())]["step_s"]
    return {
        "reference_step_s": round(ref_s, 6),
        "start": {
            "tuning": describe(base),
            "step_s": start_s,
            "fused_over_reference": round(start_s / ref_s, 3),
        },
        "best": {
            "tuning": describe(best),
            "step_s": best_row["step_s"],
            "fused_over_reference": round(best_row["step_s"] / ref_s, 3),
            "speedup_over_start": round(start_s / best_row["step_s"], 3),
        },
        "tried": list(tried.values()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="512:100000:512", help="B:C:D (default 512:100000:512)")
    ap.add_argument("--modes", default="ieee,tf32", help="fp32 dot modes to tune: ieee, tf32")
    ap.add_argument(
        "--passes",
        type=int,
        default=2,
        help="coordinate-descent rounds (each stops early when nothing improves)",
    )
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per candidate (median)")
    ap.add_argument(
        "--deadline", type=float, default=240, help="seconds: stop searching, write what there is"
    )
    ap.add_argument(
        "--cpu", action="store_true", help="a dry run of the search logic in Triton's interpreter"
    )
    ap.add_argument(
        "--out", default=None, help="JSON path (default bench/results/margin_softmax_tune_<device>.json)"
    )
    args = ap.parse_args()
    try:
        batch, classes, dim = (int(v) for v in args.size.split(":"))
    except ValueError:
        ap.error(f"--size: expected B:C:D integers, got {args.size!r}")
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in TOLERANCE]:
        ap.error(f"--modes: unknown {', '.join(unknown)}; choose from {', '.join(TOLERANCE)}")
    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"  # read when vigface.kernels is imported
        if modes != ["ieee"]:
            modes = ["ieee"]  # tf32 is a CUDA mode
    import torch
    import triton

    if not args.cpu and not torch.cuda.is_available():
        sys.exit("margin_softmax_tune: needs a CUDA device (or --cpu for a dry run in the interpreter)")
    import vigface.kernels.margin_softmax as ms

    from vigface.fr.margin_config import MarginConfig
    from vigface.fr.margins import MarginHead

    device = torch.device("cpu" if args.cpu else "cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2

    def start_tuning(mode):  # the pinned tiles of the mode, programs spelled out for the search
        base = ms.INTERPRETER_TUNING if args.cpu else ms.GPU_TUNING if mode == "ieee" else ms.GPU_TUNING_TF32
        return dataclasses.replace(base, programs=4 * sms) if base.programs == 0 else base

    candidates = CPU_CANDIDATES if args.cpu else CANDIDATES
    head = MarginHead(MarginConfig("arcface", 64.0, 0.5)).to(device)
    problem = make_problem(batch, classes, dim, device)
    started = time.perf_counter()
    result = {
        "benchmark": "margin_softmax_tune",
        "device": "cpu (interpreted: no timing evidence)" if args.cpu else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "config": {"batch": batch, "classes": classes, "dim": dim, "margin": "arcface s=64 m=0.5",
                   "step": "fwd+bwd", "passes": args.passes, "repeats": args.repeats, "sms": sms,
                   "tolerance": TOLERANCE},
        "modes": {},
    }  # fmt: skip
    for i, mode in enumerate(modes):  # each mode gets an equal share of the deadline
        stop_at = started + args.deadline * (i + 1) / len(modes)
        result["modes"][mode] = search(
            mode,
            problem,
            lambda c: head.target_cosine(c, None),
            start_tuning(mode),
            candidates,
            args,
            device,
            sms,
            stop_at,
        )
        ref_s, best = result["modes"][mode]["reference_step_s"], result["modes"][mode]["best"]
        ratio = best["fused_over_reference"]
        print(f"{mode}: reference {ref_s:.5f} s, best fused {best['step_s']:.5f} s ({ratio}x the reference) "
              f"with {best['tuning']}", flush=True)  # fmt: skip
    result["complete"] = time.perf_counter() - started <= args.deadline
    out = Path(args.out or f"bench/results/margin_softmax_tune_{'cpu' if args.cpu else 'cuda'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
