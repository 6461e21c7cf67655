"""Write a whole toy-world dataset: training RecordIO, landmarks table, verification .bin files.

Layout of `out/` (what `vigface data toy` makes):

    train.rec, train.idx     aligned 112x112 JPEGs, labels 0..ids-1 (insightface layout)
                             (with `unaligned=True`: the 144x144 wild images instead)
    train_landmarks.npy      (N, 5, 2) float32, row i = record key i+1, in the coordinates of
                             the stored images (stage 2's pose condition)
    toy_val.bin              held-out identities, the training nuisance mix (like LFW)
    toy_pose.bin             held-out identities, frontal vs. profile pairs (like CFP-FP)
    identities.json          the identity parameters of every identity (train and held out)
    toy.json                 the recipe and timings; written last, so its presence means done

Held-out identities follow the training ones (ids .. ids+val_ids-1) and never appear in
train.rec. Each .bin holds `pairs` pairs in 10 folds; fold f draws its pairs from its own
group of held-out identities (identity-disjoint folds, like LFW's), positives first.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vigface.data import toyfaces
from vigface.data.files import write_atomically
from vigface.data.images import encode_image
from vigface.data.output_folder import refuse_foreign_output, remove_stale_temporaries
from vigface.data.pairs import N_FOLDS, fold_pairs, repeated_pairs, write_pairs_bin
from vigface.data.recordio import FaceRecordWriter
from vigface.errors import VigfaceError, VigfaceWarning

# Image-index offsets keep the nuisance streams of the three uses of an identity apart.
_VAL_INDEX0 = 0
_FRONTAL_INDEX0 = 10_000
_PROFILE_INDEX0 = 20_000
_FRONTAL_YAW = (0.0, 0.12)
_PROFILE_YAW = (0.5, 0.75)


@dataclass(frozen=True)
class ToyConfig:
    ids: int = 500
    per_id: int = 20
    seed: int = 0
    pairs: int = 6000  # per .bin file, split over 10 folds
    val_ids: int = 200  # held-out identities for the .bin files
    val_per_id: int = 8  # images per held-out identity in toy_val.bin
    pose_per_id: int = 4  # frontal and profile images each, per held-out identity, in toy_pose.bin
    quality: int = 95  # JPEG quality of stored images
    unaligned: bool = False  # store the 144x144 wild images + wild landmarks instead

    def validate(self) -> None:
        checks = [
            (self.seed >= 0, f"--seed must be >= 0, got {self.seed}"),
            (self.ids >= 2, "--ids must be at least 2"),
            (self.per_id >= 1, "--per-id must be at least 1"),
            (
                self.pairs >= 0 and self.pairs % (2 * N_FOLDS) == 0,
                f"--pairs must be a multiple of {2 * N_FOLDS}",
            ),
            (self.pairs == 0 or self.val_ids >= 2 * N_FOLDS, f"--val-ids must be at least {2 * N_FOLDS}"),
            (self.val_per_id >= 2, "--val-per-id must be at least 2"),
            (self.pose_per_id >= 1, "--pose-per-id must be at least 1"),
            (1 <= self.quality <= 100, "--quality must be in 1..100"),
        ]
        for ok, msg in checks:
            if not ok:
                raise VigfaceError(f"toy dataset: {msg}")


def _render_one(job: tuple) -> tuple[bytes, np.ndarray]:
    """Worker: render, (align,) encode one image. Module-level so it pickles to workers."""
    seed, identity, index, nuisance_kw, quality, aligned = job
    if aligned:
        img, landmarks = toyfaces.render_aligned(seed, identity, index, **nuisance_kw)
    else:
        img, landmarks = toyfaces.render_wild(seed, identity, index, **nuisance_kw)
    return encode_image(img, "jpeg", quality=quality), landmarks


def _render_all(jobs: list[tuple], pool, desc: str, progress: bool):
    """Render jobs in order, in `pool` (or in this process when pool is None)."""
    results = map(_render_one, jobs) if pool is None else pool.imap(_render_one, jobs, chunksize=32)
    yield from tqdm(results, total=len(jobs), desc=desc, unit="img", disable=not progress)


# Every entry make_toy_dataset writes into its folder (a half-made one may hold any of them).
TOY_FILES = (
    "train.rec", "train.idx", "train_landmarks.npy", "toy_val.bin", "toy_pose.bin", "identities.json",
    "toy.json",
)  # fmt: skip


def _start_pool(workers: int):
    """A spawned pool whose workers ignore Ctrl-C from birth. The terminal sends it to every process
    of the group; the main process stops the pool and cleans up, while a worker caught by it (even
    while it is still starting up, before any initializer runs) printed a KeyboardInterrupt traceback.
    An ignored signal stays ignored across exec, and Python then leaves it so."""
    context = multiprocessing.get_context("spawn")
    if threading.current_thread() is not threading.main_thread():
        return context.Pool(workers)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return context.Pool(workers)
    finally:
        signal.signal(signal.SIGINT, previous)


def _warn_repeats(path: Path, folds, cfg: ToyConfig) -> None:
    """Few held-out identities for this many pairs: the set repeats pairs. Said from 10 % on (the
    demo's sets repeat 1-5 %, chance draws of imposter pairs among them; 2 ids x 1 image repeated 80 %)."""
    repeats = repeated_pairs(folds)
    if repeats > cfg.pairs // 10:
        warnings.warn(
            VigfaceWarning(
                f"{path.name}: {repeats} of its {cfg.pairs} pairs repeat another; ask for fewer --pairs, or "
                "more --val-ids"
            ),
            stacklevel=4,  # make_toy_dataset's caller
        )


def make_toy_dataset(
    out: str | os.PathLike,
    cfg: ToyConfig,
    *,
    workers: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Make the toy dataset described in the module docstring; returns the recipe + timings."""
    cfg.validate()
    out = Path(out)
    if (out / "toy.json").exists() and not overwrite:
        raise VigfaceError(f"{out}: already holds a toy dataset (toy.json); pass --overwrite to replace it")
    refuse_foreign_output(out, own=TOY_FILES, what="a toy dataset")  # --overwrite replaces only toy sets
    if workers < 0:
        raise VigfaceError(f"--workers must be >= 0 (0: one per core, up to 8), got {workers}")
    remove_stale_temporaries(out, own=TOY_FILES)
    # The old recipe goes first (a folder without toy.json is one being made), and the old pair sets
    # with it: a run with --pairs 0 writes none, and left the old world's beside the new one.
    for name in ("toy.json", "toy_val.bin", "toy_pose.bin"):
        (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    workers = workers or min(os.cpu_count() or 1, 8)
    # One pool for every phase (spawned: safe even after torch started threads in this process).
    pool = _start_pool(workers) if workers > 1 else None
    try:
        return _make(out, cfg, pool, workers, progress)
    finally:
        if pool is not None:
            pool.terminate()


def _make(out: Path, cfg: ToyConfig, pool, workers: int, progress: bool) -> dict:
    aligned = not cfg.unaligned
    timings = {}
    t0 = time.perf_counter()

    # Training set.
    jobs = [(cfg.seed, i, k, {}, cfg.quality, aligned) for i in range(cfg.ids) for k in range(cfg.per_id)]
    landmarks = np.empty((len(jobs), 5, 2), dtype=np.float32)
    with FaceRecordWriter(out / "train.rec") as writer:
        for n, (jpeg, lm) in enumerate(_render_all(jobs, pool, "train images", progress)):
            writer.add(jpeg, label=jobs[n][1])
            landmarks[n] = lm
    tmp = out / "train_landmarks.npy.tmp"
    with open(tmp, "wb") as f:
        np.save(f, landmarks)
    os.replace(tmp, out / "train_landmarks.npy")
    timings["train_seconds"] = time.perf_counter() - t0

    # Held-out identities for the verification sets, split into identity-disjoint folds.
    t1 = time.perf_counter()
    held_out = np.arange(cfg.ids, cfg.ids + cfg.val_ids)
    files = ["train.rec", "train.idx", "train_landmarks.npy"]
    if cfg.pairs:
        groups = np.array_split(held_out, N_FOLDS)
        n_half = cfg.pairs // (2 * N_FOLDS)
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 2]))

        # toy_val.bin: held-out images with the training nuisance mix.
        val_jobs = [
            (cfg.seed, int(a), _VAL_INDEX0 + k, {}, cfg.quality, True)
            for a in held_out
            for k in range(cfg.val_per_id)
        ]
        encoded = [jpeg for jpeg, _ in _render_all(val_jobs, pool, "toy_val images", progress)]
        slots = {
            int(a): list(range(n * cfg.val_per_id, (n + 1) * cfg.val_per_id)) for n, a in enumerate(held_out)
        }
        folds = [fold_pairs(rng, [int(a) for a in g], slots, slots, n_half, n_half, True) for g in groups]
        _warn_repeats(out / "toy_val.bin", folds, cfg)
        write_pairs_bin(out / "toy_val.bin", encoded, folds)

        # toy_pose.bin: frontal against profile views (the CFP-FP protocol).
        m = cfg.pose_per_id
        pose_jobs = []
        for a in held_out:
            pose_jobs += [
                (cfg.seed, int(a), _FRONTAL_INDEX0 + k, {"yaw_range": _FRONTAL_YAW}, cfg.quality, True)
                for k in range(m)
            ]
            pose_jobs += [
                (cfg.seed, int(a), _PROFILE_INDEX0 + k, {"yaw_range": _PROFILE_YAW}, cfg.quality, True)
                for k in range(m)
            ]
        encoded = [jpeg for jpeg, _ in _render_all(pose_jobs, pool, "toy_pose images", progress)]
        frontal = {int(a): list(range(2 * n * m, 2 * n * m + m)) for n, a in enumerate(held_out)}
        profile = {int(a): list(range(2 * n * m + m, 2 * n * m + 2 * m)) for n, a in enumerate(held_out)}
        folds = [
            fold_pairs(rng, [int(a) for a in g], frontal, profile, n_half, n_half, False) for g in groups
        ]
        _warn_repeats(out / "toy_pose.bin", folds, cfg)
        write_pairs_bin(out / "toy_pose.bin", encoded, folds)
        files += ["toy_val.bin", "toy_pose.bin"]
    timings["verification_seconds"] = time.perf_counter() - t1

    identities = toyfaces.identity_table(cfg.seed, range(cfg.ids + cfg.val_ids))
    write_atomically(out / "identities.json", json.dumps(identities))
    files.append("identities.json")

    timings["total_seconds"] = time.perf_counter() - t0
    recipe = {
        "kind": "vigface-toy",
        "config": asdict(cfg),
        "images": {"train": len(jobs), "image_size": 112 if aligned else toyfaces.WILD_SIZE},
        "landmarks": "train_landmarks.npy: (N, 5, 2) float32, row i = record key i+1; insightface order",
        "workers": workers,
        "files": files,
        **{k: round(v, 3) for k, v in timings.items()},
    }
    write_atomically(out / "toy.json", json.dumps(recipe, indent=2))
    return recipe
