"""Stage-2 training speed with the condition cache (f(x0) embedded once per image) against
recomputing f(x0) every step, in the same run, on the demo's toy setting.

    python bench/condition_cache.py                    # CPU: FULL demo's stage 2, 300 steps x 3 pairs
    python bench/condition_cache.py --steps 100 --repeats 1

Setup: the FULL demo's toy world (50 ids x 20 images at 112 px), a stage-1 FR model trained for
one epoch with the demo's recipe (its quality does not change the work of a step), then stage 2
with the demo's settings (tiny U-ViT at 32 px, batch 24) trained `--steps` steps from scratch,
with and without the cache, alternating so that the machine's drift hits both alike. Reported: the
seconds of each run (training only, after the models are loaded) and the median ratio. The runs
also check each other: the final EMA weights must be equal, since the cache is exact on the CPU.
Writes bench/results/condition_cache_<device>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from vigface.data.toy_dataset import ToyConfig, make_toy_dataset
from vigface.diffusion.trainer import train_diffusion
from vigface.eval.demo import FULL, _diffusion_config, _fr_config
from vigface.fr.trainer import train_fr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3, help="pairs of runs (cached, recomputed)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", help="JSON path (default: bench/results/condition_cache_<device>.json)")
    args = parser.parse_args()
    if args.steps < 1 or args.repeats < 1:
        parser.error(f"--steps and --repeats must be at least 1, got {args.steps} and {args.repeats}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    demo = dataclasses.replace(FULL, progress=False, device=args.device, fr_epochs=1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        toy = work / "toy"
        toy_config = ToyConfig(ids=demo.ids, per_id=demo.per_id, seed=demo.seed)
        make_toy_dataset(toy, toy_config, workers=1, progress=False)
        train_fr(_fr_config(demo, toy / "train.rec", work / "fr", demo.ids))
        runs, weights = [], {}
        for repeat in range(args.repeats):
            for cached in (True, False):
                out = work / f"dm_{cached}_{repeat}"
                config = dataclasses.replace(
                    _diffusion_config(demo, toy / "train.rec", work / "fr", out),
                    steps=args.steps, save_every=10**9, cache_conditions=cached,
                )  # fmt: skip
                t0 = time.perf_counter()
                train_diffusion(config)
                seconds = time.perf_counter() - t0
                runs.append({"cached": cached, "repeat": repeat, "seconds": round(seconds, 2)})
                print(f"cache {'on ' if cached else 'off'} repeat {repeat}: {seconds:.1f} s", flush=True)
                weights[cached] = load_file(out / "denoiser.safetensors")
                shutil.rmtree(out)
        same = all(torch.equal(weights[True][k], weights[False][k]) for k in weights[True])
    median = {c: statistics.median(r["seconds"] for r in runs if r["cached"] == c) for c in (True, False)}
    result = {
        "bench": "condition_cache",
        "device": args.device,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "config": {"steps": args.steps, "repeats": args.repeats, "batch": demo.dm_batch,
                   "images": demo.ids * demo.per_id, "denoiser": "FULL demo's: tiny U-ViT, 32 px, patch 4"},
        "runs": runs,
        "median_seconds": {"cached": median[True], "recomputed": median[False]},
        "speedup": round(median[False] / median[True], 3),
        "same_weights": same,
        "note": "seconds include the first epoch, in which every image is new and is embedded either way",
    }  # fmt: skip
    path = Path(args.out or Path(__file__).parent / "results" / f"condition_cache_{args.device}.json")
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"recomputed / cached time: {result['speedup']}x (same weights: {same}); wrote {path}")
    if not same:
        raise SystemExit("the cached and recomputed runs ended with different weights")


if __name__ == "__main__":
    main()
