"""Pick the classifier-free guidance scale w the way the paper does (§5.2, Table 1, Fig. 5).

For each w, generate `num_ids` real and `num_ids` virtual identities (`per_id` images each) with
that w, embed them with the FR model, and compare the genuine / imposter cosine histograms of
each kind with those of real data by IoU (similarity.py). The w with the highest average of the
two IoUs is picked, separately for real ids and virtual ids (the paper finds 0.5 and 2.5).

The images of one (kind, identity, image index) share their seed and pose across w, so the sweep
varies w alone.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vigface.data.alignment_check import check_dataset_alignment
from vigface.data.files import write_atomically
from vigface.data.output_folder import refuse_foreign_output
from vigface.device import resolve_device
from vigface.errors import VigfaceError
from vigface.eval.labelled_set import LabelledSet, read_labelled_set
from vigface.eval.plots import grid_rows
from vigface.eval.similarity import distribution_iou, genuine_imposter, histogram, summary

PAPER_W = {"real": 0.5, "virtual": 2.5}
SWEEP_MARK = ".cfg-sweep"  # in each w folder the sweep made, and so may delete
KINDS = ("real", "virtual")


@dataclass
class SweepConfig:
    model: str  # a denoiser folder (vigface-train-diffusion output, or the shipped tiny model)
    real: str  # real data to match: train.rec / image folder of the FR model's training set
    work: str  # where the generated sets go (one sub-folder per w)
    ws: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0, 2.5, 3.0])  # Table 1's scales
    num_ids: int = 20  # per kind
    per_id: int = 10
    # Identities of the real set measured (None: all). The histograms rest on at most `max_pairs`
    # pairs of each kind anyway; all of CASIA (0.5 M images) would be ~17 GiB decoded at 112 px.
    real_max_ids: int | None = 500
    steps: int = 50
    sampler: str = "ddim"
    batch_size: int = 64
    max_pairs: int = 50_000
    seed: int = 0
    device: str = "auto"
    keep_images: bool = False  # False: delete each w's generated set once embedded
    progress: bool = True

    def __post_init__(self):
        if not self.ws:
            raise VigfaceError("cfg sweep: give at least one guidance scale w")
        if any(not np.isfinite(w) or w < 0 for w in self.ws):
            raise VigfaceError(f"cfg sweep: every w must be a finite number >= 0, got {self.ws}")
        if self.real_max_ids is not None and self.real_max_ids < 2:
            raise VigfaceError(f"cfg sweep: real_max_ids must be None or >= 2, got {self.real_max_ids}")
        if self.num_ids < 2 or self.per_id < 2:
            raise VigfaceError("cfg sweep: need num_ids >= 2 and per_id >= 2 (imposter and genuine pairs)")
        if not 0 <= self.seed < 2**32:
            raise VigfaceError(f"cfg sweep: seed must be in [0, 2**32), got {self.seed}")
        self.ws = sorted(float(w) for w in self.ws)
        names = [sweep_folder_name(w) for w in self.ws]
        clashes = sorted({name for name in names if names.count(name) > 1})
        if clashes:  # one folder, one result row per w: two w's of one name overwrote each other
            raise VigfaceError(
                f"cfg sweep: w {self.ws} repeat a scale or differ past 6 significant digits "
                f"({', '.join(clashes)}); give distinct scales"
            )


def sweep_folder_name(w: float) -> str:
    """The sub-folder of --work holding the set generated at w."""
    return f"w{w:g}"


def _check_sweep_folder(out: Path, own: tuple[str, ...]) -> None:
    """Refuse a <work>/w<value> the sweep may not replace: only a folder it made (SWEEP_MARK) is
    deleted. Before the mark, whatever stood there was deleted, a user's own vigface-gen set too."""
    if out.exists() and not out.is_dir():
        raise VigfaceError(f"{out}: is a file; cfg-sweep writes a folder there (choose another --work)")
    refuse_foreign_output(out, own=own, what="cfg-sweep", flag="--work")
    if out.is_dir() and any(out.iterdir()) and not (out / SWEEP_MARK).is_file():
        raise VigfaceError(
            f"{out}: has no {SWEEP_MARK} mark (a vigface-gen set, or one a sweep wrote before the mark "
            "existed), so cfg-sweep does not delete it; choose another --work, or delete it yourself "
            "(nothing was changed)"
        )


def _replace_sweep_folder(out: Path) -> None:
    """Empty <work>/w<value> (checked by _check_sweep_folder) for a new set, marked as the sweep's."""
    try:
        if out.exists():
            shutil.rmtree(out)  # a sweep is cheap to redo; never mix settings
        out.mkdir(parents=True)
        (out / SWEEP_MARK).write_text("made by vigface-eval cfg-sweep; it deletes and remakes this folder\n")
    except OSError as exc:
        raise VigfaceError(f"{out}: cannot be emptied for the new set ({exc.strerror or exc})") from None


def _generate(config: SweepConfig, w: float, out: Path) -> LabelledSet:
    from vigface.generate.config import GenerationConfig
    from vigface.generate.dataset import generate_dataset

    gen = GenerationConfig(
        model=config.model, out=str(out), ids="both", num_ids=config.num_ids, per_id=config.per_id,
        w_real=w, w_virtual=w, steps=config.steps, sampler=config.sampler, batch_size=config.batch_size,
        shard_size=10**6, seed=config.seed, device=config.device, progress=config.progress,
    )  # fmt: skip
    generate_dataset(gen)
    return read_labelled_set(out)


def _histograms(dist: tuple) -> dict:
    return {"genuine": histogram(dist[0]).tolist(), "imposter": histogram(dist[1]).tolist()}


def cfg_sweep(config: SweepConfig, fr_model=None, samples: dict | None = None) -> dict:
    """Table 1 for our model: {"w", "real": [IoU rows], "virtual": [...], "picked", histograms}.

    `fr_model`: the backbone that measures similarity (default: the one the denoiser was trained
    against; the paper uses an independent ResNet-18). `samples`, when given, receives per w the
    images of the first 3 real and 3 virtual ids ({w: (rows, row names)}) for a report's grids,
    taken before the generated sets are deleted."""
    from vigface.diffusion.model_folder import fr_model_dir, read_denoiser_meta, read_schedule
    from vigface.fr.embed import embed_images, load_backbone
    from vigface.generate.dataset import OUTPUT_ENTRIES, refuse_unplannable_steps

    device = resolve_device(config.device)
    meta = read_denoiser_meta(config.model)
    # checked before any w's folder is made or --real embedded (it stopped the first w's generation)
    refuse_unplannable_steps(read_schedule(config.model, meta), config.sampler, config.steps)
    if fr_model is None:
        fr_model, _ = load_backbone(fr_model_dir(config.model, meta), device)
    for w in config.ws:  # every folder before any work (a refused second w came after the first)
        _check_sweep_folder(Path(config.work) / sweep_folder_name(w), OUTPUT_ENTRIES)
    check_dataset_alignment(config.real, "--real")
    real = read_labelled_set(config.real, max_ids=config.real_max_ids)
    real_emb = embed_images(fr_model, real.images, device=device)
    real_dist = genuine_imposter(real_emb, real.labels, max_pairs=config.max_pairs, seed=config.seed)
    result = {
        "config": asdict(config),
        "w": config.ws,
        "real": [],
        "virtual": [],
        "real_data": summary(*real_dist),
        "histograms": {"real data": _histograms(real_dist)},
        "paper_w": PAPER_W,
    }
    for w in config.ws:
        out = Path(config.work) / sweep_folder_name(w)
        _replace_sweep_folder(out)
        gen = _generate(config, w, out)
        emb = embed_images(fr_model, gen.images, device=device)
        for kind in KINDS:
            sel = gen.kinds == kind
            dist = genuine_imposter(emb[sel], gen.labels[sel], max_pairs=config.max_pairs, seed=config.seed)
            row = {
                "w": w,
                **distribution_iou(real_dist, dist),
                **{f"{k}_stats": v for k, v in summary(*dist).items()},
            }
            result[kind].append(row)
            result["histograms"][f"{kind} ids, w={w:g}"] = _histograms(dist)
        if samples is not None:
            rows, names = [], []
            for kind in KINDS:
                sel = gen.kinds == kind
                kind_rows, kind_names = grid_rows(gen.images[sel], gen.labels[sel], ids=3, per_id=8)
                rows += kind_rows
                names += [f"{kind} {name}" for name in kind_names]
            samples[w] = (rows, names)
        if not config.keep_images:
            shutil.rmtree(out, ignore_errors=True)
    result["picked"] = {
        kind: result[kind][int(np.argmax([r["average"] for r in result[kind]]))]["w"] for kind in KINDS
    }
    return result


def write_sweep(result: dict, path: str | os.PathLike) -> None:
    write_atomically(path, json.dumps(result, indent=2))
