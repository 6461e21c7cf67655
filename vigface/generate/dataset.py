"""Generate a face dataset of real and/or virtual identities, shard by shard, resumably.

    out/shards/shard_00000/   data.rec, data.idx, landmarks.npy, meta.json   (appears by atomic rename)
                              meta.json holds the other three files' sha256, checked by the merge
    out/train.rec/.idx        all shards merged, identity ranges in record 0 (format=rec)
    out/<label>/<n>.jpg       the same as an image folder + manifest.jsonl   (format=folder)
    out/train_landmarks.npy   the pose landmarks each image was generated with (output frame)
    out/shards.jsonl          one line per shard: name, images, sha256 of data.rec
    out/generation.json       the config and the label -> (kind, prototype index) map

Everything about image i is a function of the config: its identity, its pose landmarks, its seed
(hence x_T), the batch it is sampled in (shards are cut into fixed batches). A shard directory is
written under a temporary name and renamed when complete, so after `kill -9` a rerun finds the
finished shards, regenerates the rest, and produces byte-identical files with no image lost or
duplicated. A rerun must keep the settings of the finished shards; one that stopped before its first
shard (out of GPU memory at its batch size) binds nothing, and a rerun's settings replace it.
With torchrun, rank r generates shards r, r + W, r + 2W, ...; rank 0 merges.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from vigface.data.align import ARCFACE_TEMPLATE_112
from vigface.data.alignment_check import warn_if_not_aligned
from vigface.data.files import fsync_dir, resolved_paths
from vigface.data.image_folder import ImageFolderDataset, ImageFolderWriter
from vigface.data.images import encode_image
from vigface.data.landmarks_npy import read_landmarks_npy
from vigface.data.output_folder import process_running, refuse_foreign_output
from vigface.data.recordio import FaceRecordDataset, FaceRecordWriter
from vigface.diffusion.model_folder import (
    DENOISER_WEIGHTS,
    POSE_TABLE,
    PROTOTYPES,
    fr_model_dir,
    load_prototypes,
    prototypes_backbone_sha256,
    read_denoiser_meta,
    read_schedule,
)
from vigface.diffusion.pose import landmark_image, rescale_landmarks
from vigface.diffusion.sampling import FaceSampler
from vigface.engines.fused_update import plan_steps
from vigface.errors import DataFormatError, VigfaceError, VigfaceWarning
from vigface.fr.distributed import finish_distributed, setup_distributed
from vigface.fr.embed import file_sha256
from vigface.fr.rng import step_seed
from vigface.generate.config import PRESETS, GenerationConfig
from vigface.run_lock import FolderLock

MAX_PLANNED_IMAGES = 25_000_000  # preset L (120k ids x 50) for both kinds is 12M
# What a rec-format generation writes into its --out (see the module doc): callers that clear a
# generated set (cfg-sweep) delete a folder only when it holds nothing else.
OUTPUT_ENTRIES = (
    "shards",
    "generation.json",
    "train.rec",
    "train.idx",
    "train_landmarks.npy",
    "shards.jsonl",
)


def _images_per_id(config: GenerationConfig) -> int:
    if config.per_id is not None:
        return config.per_id
    return PRESETS[config.preset][1] if config.preset else 20


def plan_jobs(config: GenerationConfig, num_real: int, num_virtual: int) -> list[tuple[int, str, int, int]]:
    """Every image to make, in output order: (label, kind, prototype index, image index)."""
    wanted = (
        config.num_ids
        if config.num_ids is not None
        else (PRESETS[config.preset][0] if config.preset else None)
    )
    kinds = ("real", "virtual") if config.ids == "both" else (config.ids,)
    counts = {}
    for kind in kinds:
        available = num_real if kind == "real" else num_virtual
        counts[kind] = available if wanted is None else wanted
        if counts[kind] > available:
            raise VigfaceError(
                f"generation: {counts[kind]} {kind} identities asked for, the FR model has {available}"
            )
    per_id = _images_per_id(config)
    if sum(counts.values()) * per_id > MAX_PLANNED_IMAGES:  # the plan is a list: 10**8 images took 8 GB
        raise VigfaceError(
            f"generation: {sum(counts.values()) * per_id:,} images asked for "
            f"({' + '.join(f'{n:,}' for n in counts.values())} ids x {per_id:,}); one run plans at most "
            f"{MAX_PLANNED_IMAGES:,} (twice preset L for both kinds): split it into runs with other --seed "
            "and --out"
        )
    jobs, label = [], 0
    for kind in kinds:
        count = counts[kind]
        for proto in range(count):
            jobs += [(label, kind, proto, image) for image in range(per_id)]
            label += 1
    if not jobs:
        raise VigfaceError("generation: nothing to generate (no identities of the requested kind)")
    return jobs


def _job_seed(config: GenerationConfig, kind: str, proto: int, image: int) -> int:
    return step_seed(config.seed, proto * 1_000_003 + image, "diffusion", rank=1 if kind == "virtual" else 0)


def _pose_landmarks(config: GenerationConfig, table: np.ndarray | None, jobs: list) -> np.ndarray:
    """(len(jobs), 5, 2) landmarks in the 112x112 aligned frame, one drawn per image from its seed."""
    if config.pose == "frontal" or table is None:
        return np.repeat(ARCFACE_TEMPLATE_112[None].astype(np.float32), len(jobs), axis=0)
    rows = [
        np.random.default_rng(_job_seed(config, kind, p, i)).integers(len(table)) for _, kind, p, i in jobs
    ]
    return table[np.asarray(rows)].astype(np.float32)


def _load_pose_table(config: GenerationConfig, meta: dict) -> np.ndarray | None:
    """The landmarks table poses are drawn from, in the 112 frame; `meta`: the model's denoiser.json."""
    if config.pose == "frontal":
        return None
    train_config = meta.get("train_config", {})
    in_stored_frame = False  # a table in the frame of the training images (rescaled below)
    if config.pose != "dataset":
        path = Path(config.pose)
    elif config.landmarks:
        path = Path(config.landmarks)
    elif (Path(config.model) / POSE_TABLE).is_file():
        path = Path(config.model) / POSE_TABLE
        in_stored_frame = meta.get("pose_table_frame") != 112  # exported before the table was moved to 112
    else:  # a denoiser folder from before pose tables were exported: the training set's own table
        data = Path(train_config.get("data", ""))
        rec = data / "train.rec" if data.is_dir() else data
        path = (
            Path(train_config["landmarks"])
            if train_config.get("landmarks")
            else rec.with_name(f"{rec.stem}_landmarks.npy")
        )
        in_stored_frame = True
    if not path.is_file():
        raise DataFormatError(path, "pose landmarks not found (pass --landmarks FILE or --pose frontal)")
    table = read_landmarks_npy(path)
    # Rows without 5 finite points (a training image without a detection) are no pose: drawn, they
    # made NaN pose images and NaN landmarks in the output, with exit 0
    finite = np.isfinite(table).all(axis=(1, 2))
    if not finite.any():
        raise DataFormatError(path, f"none of its {len(table)} rows holds 5 finite points: no pose to draw")
    table = table[finite]
    if in_stored_frame:
        table = rescale_landmarks(table, _stored_image_size(train_config.get("data")), 112)
    warn_if_not_aligned(table, 112, f"poses {path}")  # drawn in the aligned 112 frame
    return table


def remove_stale_shards(shard_root: Path, world_size: int) -> None:
    """Remove a killed run's partial shards (`.tmp-shard_<k>-<pid>`): with one rank (the folder
    lock held) all of them; with several, those whose process is gone (the live ranks of this run
    are writing theirs). Each rank used to leave the others' to them, so none were ever removed."""
    for stale in shard_root.glob(".tmp-shard_*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if world_size == 1 or (pid.isdigit() and not process_running(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)


def _stored_image_size(data: str | None) -> int:
    """Side of the images a denoiser was trained on (its landmarks' frame); 112, the size of
    aligned FR sets, when the training set is not named or cannot be opened here (moved, or the
    model was made elsewhere, like the shipped one)."""
    from vigface.data.loaders.source import open_face_dataset

    if not data or not Path(data).exists():
        return 112
    try:
        return int(open_face_dataset(data)[0][0].shape[0])
    except (OSError, VigfaceError, IndexError):
        return 112


# Plan fields naming input files. A plan records what they held (inputs_sha256), so a rerun of an
# unfinished generation is matched by content: the model may have moved (a reinstalled package
# ships its tiny model elsewhere) or be named another way (relative, absolute), but weights
# retrained in place are refused rather than mixed with the shards already made.
_PLAN_PATHS = ("model", "prototypes", "landmarks", "pose")
# precision None means fp32 there (their classes' default precision in vigface/engines/; trt's
# None means the plan's own)
FP32_DEFAULT_ENGINES = ("eager", "compile", "cudagraph", "onnx")
_POSE_NAMES = ("dataset", "frontal")


def _array_sha256(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _plan_paths(config: dict) -> dict:
    """`config` with its input paths (and out) absolute; pose names stay as they are."""
    paths = {k: resolved_paths(config.get(k)) for k in (*_PLAN_PATHS, "out") if config.get(k)}
    if config.get("pose") in _POSE_NAMES:
        paths.pop("pose", None)
    return {**config, **paths}


def _names_a_file(key: str, value) -> bool:
    return key in _PLAN_PATHS and not (key == "pose" and value in _POSE_NAMES)


def _comparable(config: dict) -> dict:
    """A plan's config with the defaults that mean one computation spelt one way: kernels missing
    (plans from before the option, and every reference run's) is "reference", and precision None is
    fp32 for the engines whose default that is. A rerun with --precision fp32 was refused as
    "precision None there, 'fp32' now"."""
    config = {"kernels": "reference", **config}
    if config.get("precision") is None and config.get("engine") in FP32_DEFAULT_ENGINES:
        config["precision"] = "fp32"
    return config


def _plan_changes(saved, plan: dict) -> list[str]:
    """What differs between a saved plan and this run's, as 'name <there>, <now>' (empty: same)."""
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        return ["its plan is not readable"]
    before, now = _comparable(_plan_paths(saved["config"])), _comparable(plan["config"])
    hashes = saved.get("inputs_sha256")  # None in plans written before hashes: paths compared then
    if hashes is not None and not isinstance(hashes, dict):
        return ["its plan is not readable"]
    changes = []
    for key in sorted(set(before) | set(now)):
        if key == "out" or before.get(key) == now.get(key):
            continue
        if hashes is not None and _names_a_file(key, before.get(key)) and _names_a_file(key, now.get(key)):
            continue  # compared by content below
        changes.append(f"{key} {before.get(key)!r} there, {now.get(key)!r} now")
    if hashes is not None:
        changes += [
            f"the {key} differ"
            for key in plan["inputs_sha256"]
            if hashes.get(key) != plan["inputs_sha256"][key]
        ]
    for key in ("images", "shards"):
        if not changes and saved.get(key) != plan[key]:
            changes.append(f"{key} {saved.get(key)} there, {plan[key]} now")
    return changes


def refuse_unplannable_steps(schedule, sampler: str, steps: int) -> None:
    """VigfaceError naming --steps and --sampler if `sampler` cannot take `steps` on `schedule`."""
    try:
        plan_steps(schedule, sampler, steps)
    except VigfaceError as exc:
        raise VigfaceError(f"--steps {steps} with --sampler {sampler}: {exc}") from None


SHARD_FILES = ("data.rec", "data.idx", "landmarks.npy")  # beside meta.json, which holds their sha256


class _Generator:
    def __init__(self, config: GenerationConfig, lock: FolderLock):
        self.config = c = config
        self.lock = lock
        self.rank, self.world_size, self.device = setup_distributed(c.device)
        # a step count the model's schedule cannot take: refused before anything is written, and
        # before the weights load and an engine is built (an ONNX export, a TensorRT build)
        refuse_unplannable_steps(read_schedule(c.model, read_denoiser_meta(c.model)), c.sampler, c.steps)
        self.sampler = FaceSampler.load(c.model, self.device, c.engine, c.precision, c.kernels)
        if c.prototypes:
            proto_path = Path(c.prototypes)
        elif (Path(c.model) / PROTOTYPES).is_file():
            proto_path = Path(c.model) / PROTOTYPES
        else:  # a denoiser folder from before prototypes were copied into it
            proto_path = fr_model_dir(c.model, self.sampler.meta) / PROTOTYPES
        if not proto_path.is_file():
            raise DataFormatError(proto_path, "prototypes not found (pass --prototypes)")
        made_by = prototypes_backbone_sha256(proto_path)
        trained_with = self.sampler.meta.get("fr_sha256")
        if made_by and trained_with and made_by != trained_with and self.rank == 0:
            warnings.warn(
                VigfaceWarning(
                    f"--prototypes {proto_path}: they come from another FR model than the one the denoiser "
                    "was trained against (backbone sha256 differs), so its faces will not show their ids"
                ),
                stacklevel=2,
            )
        self.prototypes = load_prototypes(proto_path)
        cond_dim = self.sampler.config.cond_dim  # checked before the plan is written, not at the first batch
        for kind, table in self.prototypes.items():
            if table.shape[1] != cond_dim:
                raise DataFormatError(
                    proto_path,
                    f"its {kind} prototypes are {table.shape[1]}-d, but the denoiser takes {cond_dim}-d "
                    "conditions (prototypes of another FR model?)",
                )
            if not torch.isfinite(table).all():
                raise DataFormatError(proto_path, f"its {kind} prototypes hold NaN or infinite values")
        self.jobs = plan_jobs(c, len(self.prototypes["real"]), len(self.prototypes["virtual"]))
        self.table = _load_pose_table(c, self.sampler.meta) if self.sampler.config.pose else None
        self.inputs_sha256 = {
            "denoiser weights": file_sha256(Path(c.model) / DENOISER_WEIGHTS),
            "prototypes": _array_sha256(self.prototypes["real"].numpy(), self.prototypes["virtual"].numpy()),
            "poses": None if self.table is None else _array_sha256(self.table),
        }
        self.out = Path(c.out)
        self.shard_root = self.out / "shards"
        self.num_shards = (len(self.jobs) + c.shard_size - 1) // c.shard_size
        self._check_or_write_plan()

    def _check_or_write_plan(self) -> None:
        config = {k: v for k, v in self.config.to_dict().items() if k not in ("device", "progress")}
        if config["kernels"] == "reference":
            del config["kernels"]  # plans written before the option existed still match
        plan = {
            "config": _plan_paths(config),
            "inputs_sha256": self.inputs_sha256,
            "images": len(self.jobs),
            "shards": self.num_shards,
        }
        path = self.out / "generation.json"
        if self.rank == 0 and (self.out.is_dir() or not self.out.exists()):
            # the folder lock before the plan is read or written: two first runs into one new
            # folder could otherwise each write their plan, and the one that ran keep the other's
            self.out.mkdir(parents=True, exist_ok=True)
            self.lock.acquire(self.rank)
        # Every rank must reach the barrier below: a rank that returned early because rank 0 had
        # just written the file would be one barrier behind for the rest of the run (seen in CI).
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                saved = exc
            if not isinstance(saved, dict):
                why = saved if isinstance(saved, Exception) else "not a JSON object"
                raise DataFormatError(path, f"is not a generation plan ({why}); choose another --out")
            changes = _plan_changes(saved.get("plan"), plan)
            finished = (self.out / "train.rec").is_file() or (self.out / "manifest.jsonl").is_file()
            if changes and not finished and not any(self.shard_root.glob("shard_*")):
                # Nothing of the earlier plan was made (a run stopped in its first shard, e.g. out
                # of GPU memory at its batch size): its settings bind nothing, so they are replaced.
                if self.rank == 0:
                    warnings.warn(
                        VigfaceWarning(
                            f"{self.out}: no shard of the generation started there was finished, so "
                            f"this run's settings replace its ({'; '.join(changes)})"
                        ),
                        stacklevel=2,
                    )
                    self._write_plan(plan, path)
            elif changes:
                advice = (
                    "it is finished: choose another --out"
                    if finished
                    else "rerun with its settings to finish it, or choose another --out"
                )
                raise VigfaceError(
                    f"{self.out} holds a generation with other settings ({'; '.join(changes)}); {advice}"
                )
        else:
            # No plan yet: the folder must be new or empty (its plan is the first thing written).
            # Every rank checks, so that all of them stop rather than wait at the barrier.
            refuse_foreign_output(self.out, own=("shards", "generation.json"), what="vigface-gen")
            made = sorted(p.name for p in self.shard_root.glob("shard_*"))
            if made:  # finished shards whose plan is gone cannot be matched to these settings
                shown = ", ".join(made[:3]) + (" ..." if len(made) > 3 else "")
                raise VigfaceError(
                    f"{self.out}: holds finished shards ({shown}) "
                    f"but no generation.json, the plan that made them, so they cannot be matched to these "
                    f"settings; remove {self.shard_root} or choose another --out"
                )
            if self.rank == 0:
                self._write_plan(plan, path)
        if self.world_size > 1:
            dist.barrier()

    def _write_plan(self, plan: dict, path: Path) -> None:
        self.shard_root.mkdir(parents=True, exist_ok=True)
        labels = {}
        for label, kind, proto, _ in self.jobs:
            labels.setdefault(str(label), [kind, proto])
        tmp = self.out / ".generation.json.tmp"
        tmp.write_text(json.dumps({"plan": plan, "labels": labels}, indent=2))
        os.replace(tmp, path)

    def shard_dir(self, k: int) -> Path:
        return self.shard_root / f"shard_{k:05d}"

    def make_shard(self, k: int) -> None:
        c = self.config
        jobs = self.jobs[k * c.shard_size : (k + 1) * c.shard_size]
        landmarks = _pose_landmarks(c, self.table, jobs)
        tmp = self.shard_root / f".tmp-shard_{k:05d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            self._write_shard(k, jobs, landmarks, tmp)
        except BaseException:  # Ctrl-C, a full disk: no partial shard left for the rerun to clear
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # A shard folder without meta.json (written last, so it appears only through damage) is
        # made again here: the rename onto it failed with "Directory not empty"
        shutil.rmtree(self.shard_dir(k), ignore_errors=True)
        os.rename(tmp, self.shard_dir(k))  # the shard exists only once it is complete
        fsync_dir(self.shard_root)

    def _write_shard(self, k: int, jobs: list, landmarks: np.ndarray, tmp: Path) -> None:
        c = self.config
        size = self.sampler.config.image_size
        with FaceRecordWriter(tmp / "data.rec", fmt="jpeg", quality=c.quality) as writer:
            for lo in range(0, len(jobs), c.batch_size):
                batch = jobs[lo : lo + c.batch_size]
                cond = torch.stack([self.prototypes[kind][p] for _, kind, p, _ in batch])
                pose = (
                    landmark_image(torch.from_numpy(landmarks[lo : lo + len(batch)]), size)
                    if self.sampler.config.pose
                    else None
                )
                w = torch.tensor([c.w_real if kind == "real" else c.w_virtual for _, kind, _, _ in batch])
                seeds = [_job_seed(c, kind, p, i) for _, kind, p, i in batch]
                images = self.sampler.sample(cond, pose, w, seeds, steps=c.steps, sampler=c.sampler)
                if size != c.output_size:
                    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
                    x = F.interpolate(x, size=(c.output_size, c.output_size), mode="bicubic", antialias=True)
                    images = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
                for (label, *_), image in zip(batch, images, strict=True):
                    writer.add(encode_image(image, "jpeg", c.quality), label)
        np.save(tmp / "landmarks.npy", rescale_landmarks(landmarks, 112, c.output_size))  # pixel centres
        # the checksums let the merge tell a shard damaged on disk from a good one (shards before
        # them carry none and are merged unchecked)
        meta = {"shard": k, "first_image": k * c.shard_size, "images": len(jobs)}
        for name in SHARD_FILES:
            meta[f"{name}_sha256"] = file_sha256(tmp / name)
        (tmp / "meta.json").write_text(json.dumps(meta))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())

    def run(self) -> dict:
        mine = [k for k in range(self.num_shards) if k % self.world_size == self.rank]
        self.lock.acquire(self.rank)  # before the clean-up below, which would take another run's shards
        remove_stale_shards(self.shard_root, self.world_size)
        todo = [k for k in mine if not (self.shard_dir(k) / "meta.json").is_file()]
        if todo:  # a shard made again (e.g. deleted after the merge) outdates the merged set
            (self.out / "shards.jsonl").unlink(missing_ok=True)
        bar = tqdm(
            total=len(mine),
            initial=len(mine) - len(todo),
            desc="shards",
            disable=not (self.config.progress and self.rank == 0),
        )
        for k in todo:
            self.make_shard(k)
            bar.update(1)
        bar.close()
        if self.world_size > 1:
            dist.barrier()  # every shard is made
            # Every rank leaves the process group now, before the merge. The others used to wait
            # for rank 0's merge under the store's timeout (10 minutes with NCCL), and a large set
            # takes minutes to merge: this 2-core CPU merged ~21,000 5-KB images/s from the page
            # cache, ~5 minutes for VIGFace(L)'s 6M. Their timeout stopped the job, merge and all.
            finish_distributed()
        merged = self.rank == 0 and not self.merged_already()
        if merged:
            self.merge()
        return {
            "out": str(self.out),
            "images": len(self.jobs),
            "shards": self.num_shards,
            "generated": len(todo),
            "merged": merged,
        }

    def merged_already(self) -> bool:
        """True for a finished set: shards.jsonl, written last by merge() and removed whenever a
        shard is made again, names every shard, and the merged set opens with all their images.
        A rerun of a finished command then returns at once instead of merging them all again; a
        merged set that is cut, or lacks a file, is merged again."""
        listing = self.out / "shards.jsonl"
        if not listing.is_file() or not (self.out / "train_landmarks.npy").is_file():
            return False
        try:
            rows = [json.loads(line) for line in listing.read_text().splitlines()]
            names, images = [row["shard"] for row in rows], sum(int(row["images"]) for row in rows)
            if self.config.format == "rec":
                merged = FaceRecordDataset(self.out / "train.rec")
                found = len(merged)
                merged.close()
            else:
                folder = ImageFolderDataset(self.out)  # refuses a folder marked unfinished
                found = len(folder) if folder.manifest_path is not None else -1  # the manifest is an output
        except (ValueError, KeyError, TypeError, OSError, VigfaceError):
            return False  # missing or damaged: merge again
        return names == [self.shard_dir(k).name for k in range(self.num_shards)] and found == images

    def merge(self) -> None:
        """Shards -> train.rec (or an image folder) + landmarks + shards.jsonl, each by atomic rename."""
        c = self.config
        lines, tables = [], []
        writer = (
            FaceRecordWriter(self.out / "train.rec")
            if c.format == "rec"
            else ImageFolderWriter(self.out, overwrite=True)
        )
        with writer:
            for k in range(self.num_shards):
                shard = self.shard_dir(k)
                data, table, digest = self._read_shard(shard)
                for i in range(len(data)):
                    payload, label = data.encoded(i)
                    if c.format == "rec":
                        writer.add(payload, label)
                    else:  # the manifest carries each image's landmarks, as an aligned folder's does
                        writer.add(payload, label, landmarks=table[i].tolist())
                tables.append(table)
                lines.append(json.dumps({"shard": shard.name, "images": len(data), "sha256": digest}))
                data.close()
        np.save(self.out / ".train_landmarks.tmp.npy", np.concatenate(tables))
        os.replace(self.out / ".train_landmarks.tmp.npy", self.out / "train_landmarks.npy")
        (self.out / ".shards.jsonl.tmp").write_text("".join(line + "\n" for line in lines))
        os.replace(self.out / ".shards.jsonl.tmp", self.out / "shards.jsonl")

    def _read_shard(self, shard: Path) -> tuple[FaceRecordDataset, np.ndarray, str]:
        """A finished shard's images, landmarks and data.rec sha256, checked against its meta.json;
        a damaged shard is named with what to do (it was a reader's error about data.idx)."""
        advice = f"remove {shard} and rerun the same command: that shard is made again with the same bytes"
        try:
            meta = json.loads((shard / "meta.json").read_text())
            if not isinstance(meta, dict):
                raise VigfaceError("its meta.json is not a JSON object")
            digests = {name: file_sha256(shard / name) for name in SHARD_FILES}
            for name, digest in digests.items():
                if meta.get(f"{name}_sha256") not in (None, digest):
                    raise VigfaceError(f"{name} does not match the checksum in its meta.json")
            table = np.load(shard / "landmarks.npy")  # before the dataset opens: a failure leaks no file
            data = FaceRecordDataset(shard / "data.rec")
            if len(data) != meta["images"] or table.shape != (meta["images"], 5, 2):
                data.close()
                raise VigfaceError(
                    f"holds {len(data)} images and {len(table)} landmark rows, "
                    f"its meta.json says {meta['images']}"
                )
        except KeyError as exc:
            raise VigfaceError(f"{shard}: damaged (its meta.json has no {exc}); {advice}") from None
        except (OSError, ValueError, TypeError, VigfaceError) as exc:
            raise VigfaceError(f"{shard}: damaged ({exc}); {advice}") from None
        return data, table, digests["data.rec"]


def generate_dataset(config: GenerationConfig) -> dict:
    """Generate (or finish generating) the dataset described by `config`."""
    torch.set_flush_denormal(True)  # subnormals slow x86 CPU arithmetic ~10x (see the trainers)
    with FolderLock(config.out) as lock:
        summary = _Generator(config, lock).run()
    finish_distributed()
    return summary
