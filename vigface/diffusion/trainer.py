"""Stage-2 trainer: the identity- and pose-conditioned denoiser on (x0, f(x0), landmarks) triples.

Each step: decode a batch, normalise to [-1, 1] at the denoiser's resolution, rasterise the
images' landmarks into the pose image, take the frozen FR backbone's normalised embedding
f(x0) as the condition, draw t / noise / condition dropout from a (seed, step, rank) generator,
and minimise eq. 8. An EMA of the weights is kept; it is what gets exported for sampling.

Like the stage-1 trainer: one process or torchrun (DDP), atomic safetensors + JSON checkpoints,
`resume=True` continues bit-for-bit on CPU, a non-finite loss stops the run without writing a
checkpoint after it. Outputs: denoiser.safetensors (EMA weights) + denoiser.json (config, the FR
model's sha256 and folder, step), and for generation a copy of the FR model's
prototypes.safetensors and pose_landmarks.npy (up to 100k training landmark sets), so the folder
generates on its own.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from vigface.data.alignment_check import warn_if_not_aligned
from vigface.data.files import usual_permissions, write_atomically
from vigface.data.image_folder import ImageFolderDataset
from vigface.data.landmarks_npy import read_landmarks_npy
from vigface.data.loaders import make_loader
from vigface.diffusion.condition_cache import ConditionCache
from vigface.diffusion.config import DiffusionTrainConfig
from vigface.diffusion.denoiser import Denoiser
from vigface.diffusion.loss import VirtualRows, diffusion_loss, identity_features, spread_around
from vigface.diffusion.model_folder import (
    DENOISER_META,
    DENOISER_WEIGHTS,
    MAX_POSE_ROWS,
    POSE_TABLE,
    PROTOTYPES,
    load_prototypes,
)
from vigface.diffusion.pose import landmark_image, rescale_landmarks
from vigface.errors import DataFormatError, VigfaceError
from vigface.fr.checkpoint import (
    append_metrics,
    check_finite,
    check_resumable,
    check_weights_finite,
    checkpoint_dir,
    load_checkpoint,
    load_optimizer_state,
    optimizer_state,
    resume_point,
    save_checkpoint,
    start_run_folder,
    trim_metrics,
)
from vigface.fr.distributed import finish_distributed, setup_distributed, wrap_ddp
from vigface.fr.embed import load_backbone
from vigface.fr.rng import step_generator, step_seed
from vigface.run_lock import FolderLock


def load_landmarks(config: DiffusionTrainConfig, dataset) -> np.ndarray:
    """(N, 5, 2) float32 landmarks of the training images, in dataset order."""
    if config.landmarks:
        path = Path(config.landmarks)
    elif isinstance(dataset, ImageFolderDataset):
        if dataset.landmarks is None:
            raise DataFormatError(dataset.root, f"{dataset.why_no_landmarks()}; pass --landmarks")
        return dataset.landmarks
    else:
        rec = Path(dataset.rec_path)
        path = rec.with_name(f"{rec.stem}_landmarks.npy")
    if not path.is_file():
        raise DataFormatError(path, "landmarks table not found (pass --landmarks, or --no-pose)")
    return read_landmarks_npy(path, len(dataset), f"the {len(dataset)} images of {config.data}")


class _Run:
    def __init__(self, config: DiffusionTrainConfig, resume: bool, lock: FolderLock):
        self.config = c = config
        self.out = Path(c.out)
        self.rank, self.world_size, self.device = setup_distributed(c.device)
        self.is_main = self.rank == 0
        resume_point(self.out, resume)  # fail fast, before the data and models load
        # image_size=None: f(x0) is taken at the stored resolution; batch_inputs resizes for the denoiser.
        self.loader = make_loader(
            c.data, c.batch_size, loader=c.loader, rank=self.rank, world_size=self.world_size,
            shuffle=True, seed=c.seed, drop_last=True, device=self.device, image_size=None,
            workers=c.workers,
        )  # fmt: skip
        self.dataset = self.loader.source.dataset
        if len(self.dataset) < c.batch_size * self.world_size:
            raise VigfaceError(f"{c.data} has {len(self.dataset)} images, fewer than one global batch")
        self.landmarks = torch.from_numpy(load_landmarks(c, self.dataset)) if c.pose else None
        # The landmarks are in the frame of the stored images, which need not be 112 px.
        self.stored_size = self.dataset[0][0].shape[0] if self.landmarks is not None else None
        if self.landmarks is not None and self.is_main:  # the pose maps assume the aligned frame
            what = f"--landmarks {c.landmarks}" if c.landmarks else f"--data {c.data}"
            warn_if_not_aligned(self.landmarks.numpy(), self.stored_size, what)
        self.fr, self.fr_meta = load_backbone(c.fr_model, self.device)
        self.fr.requires_grad_(False)
        self.schedule = c.noise_schedule()
        # The condition is the FR embedding, whatever width the stage-1 model has.
        self.den_config = replace(c.denoiser_config(), cond_dim=self.fr.config.embedding_dim)
        self.conditions = None
        if c.cache_conditions and ConditionCache.fits(len(self.dataset), self.den_config.cond_dim):
            self.conditions = ConditionCache(len(self.dataset), self.den_config.cond_dim, self.device)
        self.prototypes = self._virtual_prototypes() if c.virtual_weight > 0 else None
        torch.manual_seed(step_seed(c.seed, 0, "init"))
        self.denoiser = Denoiser(self.den_config).to(self.device)
        self.ema = {k: v.detach().clone().float() for k, v in self.denoiser.state_dict().items()}
        self.names = [n for n, _ in self.denoiser.named_parameters()]
        self.opt = torch.optim.AdamW(self.denoiser.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        self.bf16 = c.amp == "bf16" or (c.amp == "auto" and self.device.type == "cuda")
        self.step = 0
        self.saved_step = -1
        self.last_checkpoint: Path | None = None
        self.out.mkdir(parents=True, exist_ok=True)
        lock.acquire(self.rank)  # before anything is written or read back
        # Again, now that no other run can write here: a run that ended between the check above
        # and the lock was overwritten by a new run, or pruned the checkpoint picked for --resume.
        checkpoint = resume_point(self.out, resume)
        if resume:
            self._load(checkpoint)
        elif self.is_main:
            start_run_folder(self.out, c)
        model = wrap_ddp(self.denoiser, self.device, self.world_size)
        self.model = torch.compile(model) if c.compile else model

    def _virtual_prototypes(self) -> dict[str, torch.Tensor]:
        """The FR model's unit real and virtual prototypes, for the virtual-identity term."""
        path = Path(self.config.fr_model) / PROTOTYPES
        if not path.is_file():
            raise DataFormatError(path, "not found; virtual_weight > 0 needs the FR model's prototypes")
        protos = load_prototypes(path)
        if len(protos["virtual"]) == 0:
            raise DataFormatError(path, "holds no virtual prototypes (train the FR model with --num-virtual)")
        return {k: v.to(self.device) for k, v in protos.items()}

    # ---- checkpoints -------------------------------------------------------------------------

    def _load(self, folder: Path) -> None:
        tensors, meta = load_checkpoint(folder)
        saved = meta.get("config", {})
        moved = saved.get("fr_model") != self.config.fr_model
        if moved and meta.get("fr_sha256") and meta["fr_sha256"] == self.fr_meta.get("sha256"):
            # The same stage-1 weights in another folder (moved or copied): the run continues as it was.
            meta = {**meta, "config": {**saved, "fr_model": self.config.fr_model}}
        check_resumable(self.config, meta, folder, self.world_size)
        self.denoiser.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.ema = {k[4:]: v.to(self.device) for k, v in tensors.items() if k.startswith("ema.")}
        load_optimizer_state(self.opt, self.names, "opt.", tensors, meta["optimizer_scalars"])
        self.step = self.saved_step = int(meta["step"])
        if self.step > self.config.steps:  # else it would stop at once and export a config it never ran
            raise VigfaceError(
                f"--resume: {self.out} is at step {self.step}, past --steps {self.config.steps}; "
                "ask for at least as many"
            )
        self.last_checkpoint = folder
        if self.is_main:
            trim_metrics(self.out / "metrics.jsonl", self.step)

    def save(self) -> None:
        check_weights_finite(self.denoiser.parameters(), self.step, self.last_checkpoint, self.world_size)
        if self.is_main:
            tensors = {f"model.{k}": v for k, v in self.denoiser.state_dict().items()}
            tensors.update({f"ema.{k}": v for k, v in self.ema.items()})
            opt_tensors, scalars = optimizer_state(self.opt, self.names, "opt.")
            tensors.update(opt_tensors)
            meta = {
                "config": self.config.to_dict(),
                "fr_sha256": self.fr_meta.get("sha256"),  # resuming with the FR model moved: same weights
                "world_size": self.world_size,
                "optimizer_scalars": scalars,
            }
            save_checkpoint(self.out, self.step, tensors, meta, self.config.keep_checkpoints)
        if self.world_size > 1:
            dist.barrier()
        self.saved_step = self.step
        self.last_checkpoint = checkpoint_dir(self.out, self.step)

    # ---- one step ----------------------------------------------------------------------------

    def batch_inputs(self, x0: torch.Tensor, index: torch.Tensor):
        """x0: (b, 3, H, W) in [-1, 1] on the device, as the loader delivers it."""
        size = self.den_config.image_size
        with torch.no_grad():  # f(x0) from the full-resolution image
            if self.conditions is None:
                cond = identity_features(self.fr, x0)
            else:
                cond = self.conditions.lookup(index, x0, lambda images: identity_features(self.fr, images))
        if x0.shape[-1] != size:
            x0 = F.interpolate(x0, size=(size, size), mode="area")
        pose = None
        if self.landmarks is not None:
            pose = landmark_image(self.landmarks[index].to(self.device), size, source_size=self.stored_size)
        g = step_generator(self.config.seed, self.step, "diffusion", self.rank)
        n = x0.shape[0]
        t = torch.randint(0, self.schedule.num_steps, (n,), generator=g).to(self.device)
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        drop = (torch.rand(n, generator=g) < self.config.drop_prob).to(self.device)
        return x0, cond, pose, t, noise, drop

    def virtual_rows(self, x0: torch.Tensor, cond: torch.Tensor, pose: torch.Tensor | None) -> VirtualRows:
        """Rows for the virtual-identity term: random virtual prototypes spread like this batch's
        real embeddings around their nearest real prototype, at t in the upper half of the
        schedule, x_t made from the batch's first images (their pose image kept)."""
        c = self.config
        k = min(c.virtual_batch or max(1, c.batch_size // 4), x0.shape[0])
        virtual = self.prototypes["virtual"]
        g = step_generator(c.seed, self.step, "virtual", self.rank)
        ids = torch.randint(0, len(virtual), (k,), generator=g).to(self.device)
        z = torch.randn((k, virtual.shape[1]), generator=g).to(self.device)
        half = self.schedule.num_steps // 2
        t = torch.randint(half, self.schedule.num_steps, (k,), generator=g).to(self.device)
        noise = torch.randn((k, *x0.shape[1:]), generator=g).to(self.device)
        spread = (cond @ self.prototypes["real"].T).max(1).values.mean()
        cond_v = spread_around(virtual[ids], z, spread)
        x_t = self.schedule.q_sample(x0[:k], t, noise)
        return VirtualRows(x_t, t, cond_v, None if pose is None else pose[:k])

    @torch.no_grad()
    def update_ema(self) -> None:
        d = ema_decay_at(self.step, self.config.ema_decay)
        for k, v in self.denoiser.state_dict().items():
            if v.dtype.is_floating_point:
                self.ema[k].mul_(d).add_(v.float(), alpha=1 - d)
            else:
                self.ema[k].copy_(v)

    def train(self) -> dict:
        c = self.config
        bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        sums: dict = {}
        count = 0
        steps_per_epoch = len(self.dataset) // (c.batch_size * self.world_size)
        bar = tqdm(
            total=c.steps,
            initial=self.step,
            desc="train-diffusion",
            unit="step",
            disable=not (c.progress and self.is_main),
        )
        t_log = time.perf_counter()
        while self.step < c.steps:
            epoch = self.step // steps_per_epoch
            for x0, _, index, _ in self.loader.epoch(epoch, self.step % steps_per_epoch):
                lr = c.learning_rate(self.step)
                for group in self.opt.param_groups:
                    group["lr"] = lr
                x0, cond, pose, t, noise, drop = self.batch_inputs(x0, index)
                virtual = self.virtual_rows(x0, cond, pose) if c.virtual_weight > 0 else None
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    loss, parts = diffusion_loss(
                        self.model, self.schedule, x0, cond, pose, t=t, noise=noise, drop=drop,
                        fr_backbone=self.fr, identity_weight=c.identity_weight,
                        prediction=c.prediction, target_features=cond,
                        virtual=virtual, virtual_weight=c.virtual_weight,
                    )  # fmt: skip
                bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), self.step, bad_step)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                if c.clip_grad > 0:
                    torch.nn.utils.clip_grad_norm_(self.denoiser.parameters(), c.clip_grad)
                self.opt.step()
                self.update_ema()
                self.step += 1
                for k, v in {"loss": loss.detach(), **parts}.items():
                    sums[k] = sums.get(k, 0.0) + v.float()
                count += 1
                bar.update(1)
                finished = self.step >= c.steps
                saving = self.step % c.save_every == 0 or finished
                if self.step % c.log_every == 0 or saving:
                    check_finite(bad_step, self.last_checkpoint)
                    now = time.perf_counter()
                    record = {k: round(float(v) / count, 6) for k, v in sums.items()}
                    record.update(
                        step=self.step,
                        lr=float(f"{lr:.12g}"),  # 0.001, not 0.0010000000000000002
                        images_per_s=round(count * c.batch_size * self.world_size / (now - t_log), 1),
                    )
                    if self.is_main:
                        append_metrics(self.out, record)
                    bar.set_postfix(loss=record["loss"])
                    sums, count, t_log = {}, 0, now
                if saving:
                    self.save()
                    if self.is_main and not c.progress:  # without a bar, a line per checkpoint
                        print(
                            f"step {self.step}/{c.steps}: loss {record['loss']:.4f}, checkpoint saved",
                            flush=True,
                        )
                    t_log = time.perf_counter()  # the next images_per_s counts training only
                if finished:
                    break
        bar.close()
        if self.saved_step != self.step:
            self.save()
        return self.export()

    def export(self) -> dict:
        summary = {"out": str(self.out), "step": self.step}
        if not self.is_main:
            return summary
        weights = {k: v.detach().contiguous().cpu() for k, v in self.ema.items()}
        tmp = self.out / f".{DENOISER_WEIGHTS}.tmp"
        save_file(weights, tmp)
        usual_permissions(tmp)
        os.replace(tmp, self.out / DENOISER_WEIGHTS)
        meta = {
            "denoiser": self.den_config.to_dict(),
            "schedule": {"kind": self.schedule.kind, "num_steps": self.schedule.num_steps},
            "fr_model": str(Path(self.config.fr_model).resolve()),
            "fr_sha256": self.fr_meta.get("sha256"),
            "step": self.step,
            "ema_decay": self.config.ema_decay,
            "train_config": self.config.to_dict(),
            # pose_landmarks.npy is in the 112 frame; folders from before this field hold theirs in
            # the frame of the stored training images (generation rescales those)
            "pose_table_frame": 112,
        }
        self._export_generation_inputs()
        write_atomically(self.out / DENOISER_META, json.dumps(meta, indent=2))
        return summary

    def _export_generation_inputs(self) -> None:
        """Copy what generation needs beside the weights, so the folder works on its own (shipped,
        moved to another machine): the FR model's prototypes and a sample of the training poses."""
        protos = Path(self.config.fr_model) / "prototypes.safetensors"
        if protos.is_file():
            shutil.copyfile(protos, self.out / f".{PROTOTYPES}.tmp")
            os.replace(self.out / f".{PROTOTYPES}.tmp", self.out / PROTOTYPES)
        if self.landmarks is not None:
            # in the 112 frame generation draws poses in, whatever size the images were stored at
            table = rescale_landmarks(self.landmarks.numpy(), self.stored_size, 112)
            if len(table) > MAX_POSE_ROWS:  # the distribution, not the whole table (MS1M: 5.8M rows)
                rng = np.random.default_rng(self.config.seed)
                rows = rng.choice(len(table), MAX_POSE_ROWS, replace=False)
                table = table[np.sort(rows)]
            with open(self.out / f".{POSE_TABLE}.tmp", "wb") as f:
                np.save(f, table.astype(np.float32))
            os.replace(self.out / f".{POSE_TABLE}.tmp", self.out / POSE_TABLE)


def ema_decay_at(step: int, max_decay: float) -> float:
    """EMA decay for the update after optimizer step `step` (0-based): min(max_decay, (1+n)/(10+n)).

    A fixed 0.9999 keeps 0.9999^n of the random initial weights: 67 % after 4,000 steps, and
    the toy model exported that way produced the same face for every identity (top-1 0 %, vs
    82 % from its raw weights). The warm-up lets the average follow the weights early on and
    reaches 0.999 near step 9,000, 0.9999 near step 90,000.
    """
    return min(max_decay, (1 + step) / (10 + step))


def train_diffusion(config: DiffusionTrainConfig, *, resume: bool = False) -> dict:
    """Train (or resume) stage 2; returns {"out", "step"}."""
    # Subnormal floats (tiny gradients, AdaLN gates leaving zero) make x86 CPU arithmetic
    # ~10x slower: a toy run fell from 82 to 9 images/s after 1,300 steps. Flush them to zero
    # (CPU only; CUDA kernels flush in their own way).
    torch.set_flush_denormal(True)
    with FolderLock(config.out) as lock:
        summary = _Run(config, resume, lock).train()
    finish_distributed()
    return summary
