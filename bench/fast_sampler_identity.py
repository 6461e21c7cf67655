"""Does the fast sampler keep identity? DPM-Solver++(2M) at few steps against DDIM-100, same seeds.

    python bench/fast_sampler_identity.py --model runs/dm_toy --num-ids 8 --per-id 4 --threads 1

Generates the same identities, poses and seeds (vigface-gen's pipeline) once per sampler setting,
embeds every image with the stage-1 FR backbone the denoiser was trained against, and reports per
identity kind: CST-like consistency (mean cosine between images of the same identity), SEP-like
separability (same-id minus different-id mean cosine), mean cosine to the identity's own
prototype, and, per image, the FR cosine between each setting's image and the first setting's
(eager DDIM-100) image of the same seed: the identity drift of a sampler or an engine (and its
precision: `engine@precision/...`). The issue's bar: CST/SEP within 1 % of DDIM-100. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from vigface.data.recordio import FaceRecordDataset
from vigface.diffusion.model_folder import PROTOTYPES, fr_model_dir, load_prototypes
from vigface.eval.similarity import mean_genuine_imposter
from vigface.fr.embed import embed_images, load_backbone
from vigface.generate.config import GenerationConfig
from vigface.generate.dataset import generate_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/dm_toy")
    ap.add_argument("--work", default="runs/issue10/fast_sampler")
    ap.add_argument("--num-ids", type=int, default=10)
    ap.add_argument("--per-id", type=int, default=6)
    ap.add_argument(
        "--settings",
        default="eager/ddim:100,eager/dpm++:20,eager/dpm++:10,eager/dpm++:25,onnx/ddim:100,onnx/dpm++:20",
        help="engine[+fast][@precision]/sampler:steps,... (the first is the reference), e.g. "
        "compile+fast@fp8/ddim:50 (+fast: vigface-gen --kernels fast)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--device", default="auto", help="generation device (auto: CUDA when present)")
    ap.add_argument("--out", default="bench/results/fast_sampler_identity_toy.json")
    args = ap.parse_args()
    meta = json.loads((Path(args.model) / "denoiser.json").read_text())
    fr_dir = fr_model_dir(args.model, meta)  # relative in the shipped model, absolute in trained runs
    backbone, _ = load_backbone(fr_dir)
    protos = load_prototypes(fr_dir / PROTOTYPES)
    real, virtual = protos["real"], protos["virtual"]
    everything = np.concatenate([real.numpy(), virtual.numpy()])
    result = {
        "config": vars(args),
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available() and args.device != "cpu"
        else "cpu",
        "settings": {},
    }
    reference = None
    if args.threads:
        torch.set_num_threads(args.threads)
    for setting in args.settings.split(","):
        engine, _, rest = setting.rpartition("/")
        engine, _, precision = engine.partition("@")
        engine, _, kernels = engine.partition("+")  # engine+fast: vigface-gen --kernels fast
        if kernels not in ("", "fast"):
            ap.error(f"--settings {setting!r}: '+{kernels}' is unknown; only '+fast' (the fast kernels)")
        sampler, steps = rest.split(":")
        work = Path(args.work) / "".join("_" if ch in ":/@" else "p" if ch == "+" else ch for ch in setting)
        shutil.rmtree(work, ignore_errors=True)
        t0 = time.perf_counter()
        generate_dataset(
            GenerationConfig(
                model=args.model, out=str(work), ids="both", num_ids=args.num_ids, per_id=args.per_id,
                steps=int(steps), sampler=sampler, engine=engine or "eager", precision=precision or None,
                kernels=kernels or "reference",
                batch_size=32, shard_size=256, progress=False, device=args.device,
            )
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        data = FaceRecordDataset(work / "train.rec")
        images = np.stack([data[i][0] for i in range(len(data))])
        labels = np.asarray(data.labels)
        emb = embed_images(backbone, images)
        label_map = json.loads((work / "generation.json").read_text())["labels"]
        entry = {"generation_seconds": round(seconds, 1), "images": len(images)}
        for kind in ("real", "virtual"):
            rows = np.asarray([label_map[str(label)][0] == kind for label in labels])
            own = np.asarray(
                [label_map[str(label)][1] + (len(real) if kind == "virtual" else 0) for label in labels]
            )[rows]
            e = emb[rows]
            same, diff = mean_genuine_imposter(e, labels[rows])
            entry[kind] = {
                "cst_same_id_cos": round(same, 4),
                "different_id_cos": round(diff, 4),
                "sep_same_minus_different": round(same - diff, 4),
                "cos_to_own_prototype": round(float((e @ everything.T)[np.arange(len(e)), own].mean()), 4),
            }
        if reference is None:
            reference = (setting, emb)
        else:
            entry["same_seed_fr_cos_vs_" + reference[0]] = round(float((emb * reference[1]).sum(1).mean()), 4)
            for kind in ("real", "virtual"):
                ref, cur = result["settings"][reference[0]][kind], entry[kind]
                cur["cst_rel_change_vs_reference"] = round(
                    cur["cst_same_id_cos"] / ref["cst_same_id_cos"] - 1, 4
                )
                cur["sep_rel_change_vs_reference"] = round(
                    cur["sep_same_minus_different"] / ref["sep_same_minus_different"] - 1, 4
                )
        result["settings"][setting] = entry
        print(setting, json.dumps(entry), flush=True)
        # after every setting: a run cut short keeps what it measured
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".tmp").write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".tmp").replace(out)  # never a half-written JSON


if __name__ == "__main__":
    main()
