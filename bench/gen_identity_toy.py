"""Do generated faces carry their identity? FR cosine of generated real- and virtual-id images.

    python bench/gen_identity_toy.py --model runs/dm_toy --num-ids 20 --per-id 8

Generates `num_ids` real and `num_ids` virtual identities with vigface-gen's pipeline, embeds the
images with the stage-1 backbone the denoiser was trained against, and reports per kind:
mean cosine to the identity's own prototype vs the best other prototype, top-1 rate (own
prototype nearest among all n + k), mean same-id and different-id cosine between generated
images, and for virtual ids the highest cosine to any real prototype. Writes JSON.

"Away from real ids" needs a yardstick (vigface.eval.privacy): a classifier trained on n
identities maps every face, even a person it never saw, close to one of its n prototypes. So the
same numbers are taken for the held-out people of the toy set's toy_val.bin, and every kind of
image is searched among the real training images: its best cosine to one of them, and the share
above the 95th percentile of the held-out people's (5 % of never-seen people pass that bar).
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
from vigface.data.verification_bin import load_verification_pairs
from vigface.diffusion.model_folder import PROTOTYPES, fr_model_dir, load_prototypes
from vigface.eval.privacy import training_set_search
from vigface.eval.similarity import mean_genuine_imposter
from vigface.eval.verification import best_threshold
from vigface.fr.embed import embed_images, load_backbone
from vigface.generate.config import GenerationConfig
from vigface.generate.dataset import generate_dataset


def identity_entry(emb: np.ndarray, labels: np.ndarray, own: np.ndarray, prototypes: np.ndarray) -> dict:
    """Cosine to the own prototype vs the best other, top-1 rate, same- vs different-id cosine."""
    sims = emb @ prototypes.T
    own_cos = sims[np.arange(len(emb)), own]
    others = sims.copy()
    others[np.arange(len(emb)), own] = -np.inf
    same, diff = mean_genuine_imposter(emb, labels)
    return {
        "cos_to_own_prototype": round(float(own_cos.mean()), 4),
        "best_other_prototype_cos": round(float(others.max(1).mean()), 4),
        "top1_own_prototype": round(float((sims.argmax(1) == own).mean()), 4),
        "same_id_cos": round(same, 4),
        "different_id_cos": round(diff, 4),
    }


def training_image_reference(gallery: np.ndarray, labels: np.ndarray, prototypes: np.ndarray, args) -> dict:
    """The same numbers for real training images of the first num_ids identities (per_id each):
    what the FR model itself achieves, the ceiling for generated images of real ids. `gallery`:
    the embeddings of every training image (file order), `labels` theirs."""
    rows = np.concatenate([np.flatnonzero(labels == i)[: args.per_id] for i in range(args.num_ids)])
    return identity_entry(gallery[rows], labels[rows], labels[rows], prototypes)


def held_out_reference(meta: dict, backbone, real: np.ndarray, virtual: np.ndarray):
    """Held-out people (toy_val.bin beside the training set): their best cosine to a real and to a
    virtual prototype, and the FR model's verification accuracy and threshold on those pairs."""
    val_bin = Path(meta["train_config"]["data"]).with_name("toy_val.bin")
    images, issame = load_verification_pairs(val_bin)
    emb = embed_images(backbone, images)
    threshold, accuracy = best_threshold(np.sum(emb[0::2] * emb[1::2], axis=1), np.asarray(issame))
    entry = {
        "source": str(val_bin),
        "images": len(emb),
        "max_cos_to_any_real_prototype": round(float((emb @ real.T).max(1).mean()), 4),
        "max_cos_to_any_virtual_prototype": round(float((emb @ virtual.T).max(1).mean()), 4),
        "verification_threshold": round(float(threshold), 4),
        "verification_accuracy": round(float(accuracy), 4),
    }
    return entry, emb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/dm_toy")
    ap.add_argument("--work", default="runs/gen_identity_toy")
    ap.add_argument("--num-ids", type=int, default=20)
    ap.add_argument("--per-id", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--w-real", type=float, default=0.5)
    ap.add_argument("--w-virtual", type=float, default=2.5)
    ap.add_argument("--out", default="bench/results/gen_identity_toy.json")
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    t0 = time.perf_counter()
    config = GenerationConfig(
        model=args.model, out=args.work, ids="both", num_ids=args.num_ids, per_id=args.per_id,
        steps=args.steps, w_real=args.w_real, w_virtual=args.w_virtual, batch_size=32, shard_size=256,
        progress=False,
    )  # fmt: skip
    generate_dataset(config)
    gen_seconds = time.perf_counter() - t0
    meta = json.loads((Path(args.model) / "denoiser.json").read_text())
    fr_dir = fr_model_dir(args.model, meta)
    backbone, _ = load_backbone(fr_dir)
    protos = load_prototypes(fr_dir / PROTOTYPES)
    real, virtual = protos["real"], protos["virtual"]
    everything = torch.cat([real, virtual]).numpy()
    data = FaceRecordDataset(Path(args.work) / "train.rec")
    images = np.stack([data[i][0] for i in range(len(data))])
    labels = np.asarray(data.labels)
    emb = embed_images(backbone, images)
    label_map = json.loads((Path(args.work) / "generation.json").read_text())["labels"]
    result = {"config": vars(args), "generation_seconds": round(gen_seconds, 1), "images": len(images)}
    # every real training image, embedded once: the ceiling rows and the privacy search's gallery
    train_data = FaceRecordDataset(meta["train_config"]["data"])
    gallery = embed_images(backbone, np.stack([train_data[i][0] for i in range(len(train_data))]))
    train_labels = np.asarray(train_data.labels)
    result["real_training_images"] = training_image_reference(gallery, train_labels, everything, args)
    held_out, held_out_emb = held_out_reference(meta, backbone, real.numpy(), virtual.numpy())
    kinds = {
        kind: np.asarray([label_map[str(label)][0] == kind for label in labels])
        for kind in ("real", "virtual")
    }
    search = training_set_search({kind: emb[rows] for kind, rows in kinds.items()}, gallery, held_out_emb)

    def searched(name: str) -> dict:
        return {
            "best_cos_to_a_training_image": round(search[name]["best_cos"], 4),
            "above_held_out_p95": round(search[name]["above_bar"], 4),
        }

    held_out.update(searched("never-seen people"), held_out_p95=round(search["bar"], 4))
    result["held_out_real_people"] = held_out
    for kind, rows in kinds.items():
        own_index = np.asarray(
            [label_map[str(label)][1] + (len(real) if kind == "virtual" else 0) for label in labels]
        )
        entry = identity_entry(emb[rows], labels[rows], own_index[rows], everything)
        if kind == "virtual":
            nearest_real = (emb[rows] @ real.numpy().T).max(1)
            entry["max_cos_to_any_real_prototype"] = round(float(nearest_real.mean()), 4)
        entry.update(searched(kind))
        result[kind] = entry
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
