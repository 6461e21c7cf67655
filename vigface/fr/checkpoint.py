"""Training checkpoints: a folder per step holding state.safetensors + state.json, made atomically.

    out/checkpoints/step_00001000/state.safetensors   every tensor: weights, buffers, optimizer state
    out/checkpoints/step_00001000/state.json          step, config, optimizer scalars
    out/checkpoints/latest                            name of the newest complete folder

A folder is written under a temporary name and renamed when complete, and `latest` is replaced
atomically after that, so a run killed at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vigface.data.files import fsync_dir, usual_permissions, write_atomically
from vigface.data.image_folder import MANIFEST
from vigface.diffusion.model_folder import DENOISER_META, DENOISER_WEIGHTS, POSE_TABLE, PROTOTYPES
from vigface.errors import DataFormatError, VigfaceError
from vigface.fr.embed import BACKBONE_META, BACKBONE_WEIGHTS

FORMAT_VERSION = 1


def optimizer_state(opt: torch.optim.Optimizer, names: list[str], prefix: str) -> tuple[dict, dict]:
    """Optimizer state keyed by parameter name: (tensors, JSON scalars)."""
    tensors, scalars = {}, {}
    for idx, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            name = f"{prefix}{names[idx]}.{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value
            else:
                scalars[name] = value
    return tensors, scalars


def load_optimizer_state(
    opt: torch.optim.Optimizer, names: list[str], prefix: str, tensors: dict, scalars: dict, transform=None
) -> None:
    """Inverse of `optimizer_state`; `transform(name, tensor)` may slice a tensor (sharded params)."""
    state = {}
    for idx, pname in enumerate(names):
        entry = {}
        head = f"{prefix}{pname}."
        for key, value in tensors.items():
            if key.startswith(head):
                entry[key[len(head) :]] = transform(pname, value) if transform else value
        for key, value in scalars.items():
            if key.startswith(head):
                entry[key[len(head) :]] = value
        if entry:
            state[idx] = entry
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def checkpoint_dir(out: str | os.PathLike, step: int) -> Path:
    """out/checkpoints/step_<step>: where the checkpoint of `step` lives once complete."""
    return Path(out) / "checkpoints" / f"step_{step:08d}"


def save_checkpoint(root: str | os.PathLike, step: int, tensors: dict, meta: dict, keep: int = 2) -> Path:
    """Write out/checkpoints/step_<step> atomically and point `latest` at it; keep the newest `keep`."""
    final = checkpoint_dir(root, step)
    root, name = final.parent, final.name
    root.mkdir(parents=True, exist_ok=True)
    # The trainers hold the folder's lock (vigface.run_lock), so another process's temporary is a
    # killed or failed save's (a full disk): a whole checkpoint's worth of space, freed here.
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    # safetensors wants contiguous tensors that share no memory.
    save_file(
        {k: v.detach().contiguous().clone().cpu() for k, v in tensors.items()}, tmp / "state.safetensors"
    )
    usual_permissions(tmp / "state.safetensors")
    (tmp / "state.json").write_text(json.dumps({"format": FORMAT_VERSION, "step": step, **meta}, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # a re-save of the same step (e.g. the final save right after a periodic one)
        shutil.rmtree(final)
    os.rename(tmp, final)
    pointer = root / f".latest-{os.getpid()}"
    pointer.write_text(name + "\n")
    os.replace(pointer, root / "latest")
    fsync_dir(root)
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder under out/checkpoints, or None."""
    root = Path(out) / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "state.json").is_file():
            return candidate
    done = sorted(p for p in root.glob("step_*") if (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(folder: str | os.PathLike) -> tuple[dict, dict]:
    """(tensors, meta) of one checkpoint folder, with clear errors for a damaged one."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "state.json").read_text())
    except FileNotFoundError:
        raise DataFormatError(folder / "state.json", "missing: not a checkpoint folder") from None
    except json.JSONDecodeError as exc:
        raise DataFormatError(folder / "state.json", f"not valid JSON ({exc})") from None
    if meta.get("format") != FORMAT_VERSION:
        raise VigfaceError(f"{folder}: checkpoint format {meta.get('format')!r}, expected {FORMAT_VERSION}")
    try:
        tensors = load_file(folder / "state.safetensors")
    except FileNotFoundError:
        raise DataFormatError(folder / "state.safetensors", "missing") from None
    except Exception as exc:  # safetensors raises its own SafetensorError on damaged files
        raise DataFormatError(folder / "state.safetensors", f"cannot be read: {exc}") from None
    return tensors, meta


def check_resumable(config, meta: dict, folder: Path, world_size: int) -> None:
    """Refuse a resume whose configuration or world size differs from the checkpoint's.

    `config` is a training-config dataclass with `from_dict` and `changes_from` (the fields that
    alter the computation); steps, batches and prototype shards are laid out for one world size.
    """
    saved = type(config).from_dict(meta["config"])
    changed = config.changes_from(saved)
    if changed:
        what = ", ".join(f"{k}: {getattr(saved, k)!r} -> {getattr(config, k)!r}" for k in changed)
        raise VigfaceError(f"--resume: {folder} was trained with a different configuration ({what})")
    if meta["world_size"] != world_size:
        raise VigfaceError(
            f"--resume: {folder} was written by a run on {meta['world_size']} process(es); "
            f"resume it with the same number (this run has {world_size})"
        )


def trim_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after `step` (the checkpoint a run resumes from) so none repeat."""
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    write_atomically(path, "".join(line + "\n" for line in kept))  # a full disk must not cut the log


# What a new training run refuses to find in its folder: the files a finished run of either trainer
# writes (it would replace them: a trained model copied there lost its backbone) and a dataset's
# (the data's own folder got model files mixed in). Anything else (a log the shell tees there,
# a SLURM output, notes) stays beside the run.
REPLACED_BY_A_RUN = (
    BACKBONE_WEIGHTS, BACKBONE_META, PROTOTYPES, "prototype_report.json",
    DENOISER_WEIGHTS, DENOISER_META, POSE_TABLE,
    "train.rec", "train.idx", MANIFEST, "toy.json", "generation.json",
)  # fmt: skip


def resume_point(out: str | os.PathLike, resume: bool) -> Path | None:
    """The checkpoint a run continues from; refuses to resume nothing or to overwrite a run."""
    checkpoint = latest_checkpoint(out)
    if resume and checkpoint is None:
        raise VigfaceError(
            f"--resume: there is no checkpoint under {Path(out) / 'checkpoints'} (a run stopped before its "
            "first checkpoint starts again without --resume)"
        )
    if not resume and checkpoint is not None:
        raise VigfaceError(
            f"{out} already holds checkpoints; pass --resume to continue that run or choose another --out"
        )
    if not resume:
        found = sorted(name for name in REPLACED_BY_A_RUN if (Path(out) / name).exists())
        if found:
            raise VigfaceError(
                f"{out}: holds {', '.join(found)}: a trained model or a dataset, which a new training run "
                "would replace or mix its files with; choose another --out (nothing was changed)"
            )
    return checkpoint


def start_run_folder(out: Path, config) -> None:
    """A new run's folder: config.json and an empty metrics.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / "config.json", json.dumps(config.to_dict(), indent=2))  # --resume reads it
    (out / "metrics.jsonl").write_text("")


def append_metrics(out: Path, record: dict) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


class NonFiniteLossError(VigfaceError):
    """The loss (or the weights) became NaN or infinite; the last good checkpoint is kept."""


def check_finite(
    bad_step: torch.Tensor, last_checkpoint: Path | None, what: str = "loss became NaN/inf at"
) -> None:
    """Raise NonFiniteLossError if `bad_step` (the first bad step, -1 if none) is set: the only host sync."""
    first = int(bad_step.item())
    if first >= 0:
        kept = (
            f"the last good checkpoint is {last_checkpoint}"
            if last_checkpoint
            else "no checkpoint was written yet"
        )
        raise NonFiniteLossError(
            f"{what} step {first}; training stopped and {kept}. Lower --lr, add warmup, or check the data."
        )


def check_weights_finite(params, step: int, last_checkpoint: Path | None, world_size: int) -> None:
    """Before a save: a finite loss does not guarantee finite weights (the update after it may overflow),
    and a checkpoint must never hold inf/NaN. All ranks take the same branch (shards differ)."""
    finite = torch.stack([torch.isfinite(p).all() for p in params]).all().to(torch.int32)
    if world_size > 1:
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    if not bool(finite):
        check_finite(torch.tensor(step), last_checkpoint, what="weights became non-finite at")
