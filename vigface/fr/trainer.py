"""Stage-1 trainer: backbone + VIGFace head, one process or many (torchrun, DDP + Partial FC).

    train_fr(FRTrainConfig(data="toy/train.rec", out="runs/fr", num_virtual=1000, ...))

Resuming (`resume=True`) loads out/checkpoints/latest and continues bit-for-bit the run that
would have happened without the interruption (on CPU; on GPU cuDNN's autotuned kernels may
differ in the last bits): every random draw of step t is a function of (seed, t), the data order
of epoch e a function of (seed, e), and the checkpoint holds every tensor of model, head and
optimizer state.

A non-finite loss is detected without a per-step host sync: the first bad step is recorded on the
device and checked at every log/save point, so no checkpoint is ever written after it; the run
stops with `NonFiniteLossError` naming the step and the last good checkpoint.

Outputs in `out/`: checkpoints/, metrics.jsonl, config.json, and at the end backbone.safetensors
+ backbone.json (what stage 2 and `vigface-embed` load), prototypes.safetensors (real, virtual),
prototype_report.json and prototype_similarity.png.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tqdm import tqdm

from vigface.data.alignment_check import check_dataset_alignment
from vigface.data.files import usual_permissions, write_atomically
from vigface.data.loaders import make_loader
from vigface.data.verification_bin import load_verification_pairs, read_bin
from vigface.errors import VigfaceError, VigfaceWarning
from vigface.eval.prototypes import PAPER_FIG3B, plot_prototype_similarity, prototype_stats
from vigface.eval.verification import verify_embeddings
from vigface.fr.checkpoint import (
    NonFiniteLossError,
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
from vigface.fr.config import FRTrainConfig
from vigface.fr.distributed import finish_distributed, setup_distributed, shard_bounds, wrap_ddp
from vigface.fr.embed import BACKBONE_META, BACKBONE_WEIGHTS, embed_images, file_sha256
from vigface.fr.iresnet import build_backbone
from vigface.fr.prototypes import VirtualPrototypeHead, gather_shards, resolve_head_loss
from vigface.fr.rng import step_seed
from vigface.run_lock import FolderLock


def lr_at(config: FRTrainConfig, step: int, steps_per_epoch: int) -> float:
    """Linear warmup over `warmup_epochs`, then x lr_decay at every epoch in lr_steps."""
    warm = config.warmup_epochs * steps_per_epoch
    if step < warm:
        return config.lr * (step + 1) / warm
    epoch = step / steps_per_epoch
    return config.lr * config.lr_decay ** sum(epoch >= s for s in config.lr_steps)


def _optimizer(config: FRTrainConfig, params: list) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


__all__ = ["NonFiniteLossError", "train_fr"]


def _warn_about_lr_steps_past_the_run(config: FRTrainConfig) -> None:
    """The default --lr-steps 10 18 22 under a shorter --epochs: steps past the run never fire."""
    past = [s for s in config.lr_steps if s >= config.epochs]
    if not past:
        return
    listed = " ".join(f"{s:g}" for s in past)
    if len(past) == len(config.lr_steps):
        why = "the learning rate never decays (pass --lr-steps inside the run, e.g. at 70 % and 90 % of it)"
        message = f"--lr-steps {listed} are all at or past --epochs {config.epochs}: {why}"
    else:
        inside = [f"{s:g}" for s in config.lr_steps if s < config.epochs]
        message = (
            f"--lr-steps {listed} {'is' if len(past) == 1 else 'are'} at or past --epochs {config.epochs}: "
            f"the learning rate decays only at epoch{'s' if len(inside) > 1 else ''} {' '.join(inside)}"
        )
    warnings.warn(VigfaceWarning(message), stacklevel=3)


class _Run:
    """The state of one training run; methods are the phases of `train_fr`."""

    def __init__(self, config: FRTrainConfig, resume: bool, lock: FolderLock):
        self.config = config
        self.out = Path(config.out)
        self.rank, self.world_size, self.device = setup_distributed(config.device)
        self.is_main = self.rank == 0
        if self.is_main:
            _warn_about_lr_steps_past_the_run(config)
        resume_point(self.out, resume)  # fail fast, before the data and models load
        # Decoding, flips and normalisation: vigface.data.loaders (the "torch" loader computes
        # exactly what the former DataLoader + prepare_batch did; --loader dali decodes in DALI).
        self.channels_last = (
            config.channels_last if config.channels_last is not None else self.device.type == "cuda"
        )
        self.loader = make_loader(
            config.data, config.batch_size, loader=config.loader, rank=self.rank, world_size=self.world_size,
            shuffle=True, seed=config.seed, drop_last=True, device=self.device, image_size=config.input_size,
            flip=config.flip, workers=config.workers, channels_last=self.channels_last,
            aligned=config.aligned, landmarks=config.landmarks,
        )  # fmt: skip
        self.dataset = self.loader.source
        if self.is_main and config.aligned:  # --no-aligned data is unaligned by design
            check_dataset_alignment(self.dataset, "--data", name=config.data)
        self.num_real = self.dataset.num_classes
        self.global_batch = config.batch_size * self.world_size
        if len(self.dataset) < self.global_batch:
            raise VigfaceError(
                f"{config.data} has {len(self.dataset)} images, fewer than one global batch "
                f"({config.batch_size} x {self.world_size} ranks)"
            )
        self.steps_per_epoch = len(self.dataset) // self.global_batch
        self.total_steps = config.epochs * self.steps_per_epoch
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)

        torch.manual_seed(step_seed(config.seed, 0, "init"))
        self.backbone = build_backbone(config.backbone_config()).to(self.device)
        if self.channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self.bf16 = config.amp == "bf16" or (config.amp == "auto" and self.device.type == "cuda")
        # the head's logits on a rank: the global batch of real rows (and as many virtual rows)
        # against its shard of the classes (Partial FC); the largest shard, so every rank chooses alike
        virtual_rows = config.virtual_embeddings and config.num_virtual > 0
        head_rows = self.global_batch * (2 if virtual_rows else 1)
        shards = shard_bounds(self.num_real + config.num_virtual, self.world_size)
        head_classes = max(hi - lo for lo, hi in shards)
        self.head = VirtualPrototypeHead(
            self.num_real,
            config.num_virtual,
            config.embedding_dim,
            config.margin_config(),
            virtual_embeddings=config.virtual_embeddings,
            sigma_alpha=config.sigma_alpha,
            seed=config.seed,
            rank=self.rank,
            world_size=self.world_size,
            loss=resolve_head_loss(config.loss, self.device, head_rows, head_classes),
        ).to(self.device)
        named = [(n, p) for n, p in self.backbone.named_parameters() if p.requires_grad]
        self.backbone_names = [n for n, _ in named]
        self.backbone_params = [p for _, p in named]
        self.opt_backbone = _optimizer(config, self.backbone_params)
        self.opt_head = _optimizer(config, [self.head.weight])
        self.step = 0
        self.saved_step = -1
        self.last_checkpoint: Path | None = None
        for path in config.val:  # parsed by every rank before the run folder exists: a bad --val
            read_bin(path)  # leaves nothing behind and stops all ranks alike (rank 0 decodes below)
        self.out.mkdir(parents=True, exist_ok=True)
        lock.acquire(self.rank)  # before anything is written or read back
        # Again, now that no other run can write here: a run that ended between the check above
        # and the lock was overwritten by a new run, or pruned the checkpoint picked for --resume.
        checkpoint = resume_point(self.out, resume)
        if resume:
            self._load(checkpoint)
        elif self.is_main:
            start_run_folder(self.out, config)

        model = wrap_ddp(self.backbone, self.device, self.world_size)
        self.model = torch.compile(model) if config.compile else model
        self.val_sets = {}
        if self.is_main:
            for path in config.val:
                images, issame = load_verification_pairs(path)
                self.val_sets[Path(path).stem] = (images, np.asarray(issame))

    # ---- checkpoints -------------------------------------------------------------------------

    def _load(self, folder: Path) -> None:
        tensors, meta = load_checkpoint(folder)
        check_resumable(self.config, meta, folder, self.world_size)
        prefix = "backbone."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        self.backbone.load_state_dict(state)
        self.head.load_full_weight(tensors["head.weight"].to(self.device))
        for name, buf in self.head.named_buffers():
            buf.copy_(tensors[f"head.{name}"])
        scalars = meta["optimizer_scalars"]
        load_optimizer_state(self.opt_backbone, self.backbone_names, "opt.backbone.", tensors, scalars)
        lo, hi, rows = self.head.lo, self.head.hi, self.head.num_classes

        def shard(_, t):
            return t[lo:hi] if t.ndim and t.shape[0] == rows else t

        load_optimizer_state(self.opt_head, ["weight"], "opt.head.", tensors, scalars, transform=shard)
        self.step = self.saved_step = int(meta["step"])
        if self.step > self.total_steps:  # else it would stop at once and export a config it never ran
            raise VigfaceError(
                f"--resume: {self.out} is at step {self.step}, past the {self.total_steps} steps that "
                "--epochs / --max-steps now give; ask for at least as many"
            )
        self.last_checkpoint = folder
        if self.is_main:
            trim_metrics(self.out / "metrics.jsonl", self.step)

    def _state(self) -> tuple[dict, dict]:
        """Every tensor of the run, prototypes and their optimizer state gathered (a collective)."""
        tensors = {f"backbone.{k}": v for k, v in self.backbone.state_dict().items()}
        tensors["head.weight"] = self.head.full_weight()
        for name, buf in self.head.named_buffers():
            tensors[f"head.{name}"] = buf
        t_backbone, s_backbone = optimizer_state(self.opt_backbone, self.backbone_names, "opt.backbone.")
        t_head, s_head = optimizer_state(self.opt_head, ["weight"], "opt.head.")
        for k, v in t_head.items():
            tensors[k] = gather_shards(v, self.head.num_classes) if v.shape == self.head.weight.shape else v
        tensors.update(t_backbone)
        meta = {
            "config": self.config.to_dict(),
            "epoch": self.step / self.steps_per_epoch,
            "world_size": self.world_size,
            "num_real": self.num_real,
            "num_virtual": self.config.num_virtual,
            "optimizer_scalars": {**s_backbone, **s_head},
        }
        return tensors, meta

    def save(self) -> None:
        params = (*self.backbone_params, self.head.weight)
        check_weights_finite(params, self.step, self.last_checkpoint, self.world_size)
        tensors, meta = self._state()
        if self.is_main:
            save_checkpoint(self.out, self.step, tensors, meta, self.config.keep_checkpoints)
        if self.world_size > 1:
            dist.barrier()
        # Known on every rank, so decisions that depend on it agree across ranks.
        self.saved_step = self.step
        self.last_checkpoint = checkpoint_dir(self.out, self.step)

    # ---- logging and evaluation --------------------------------------------------------------

    def log(self, record: dict) -> None:
        if self.is_main:
            append_metrics(self.out, record)

    def evaluate(self) -> dict:
        results = {}
        for name, (images, issame) in self.val_sets.items():
            emb = embed_images(self.backbone, images, batch_size=256, device=self.device)
            results[name] = round(verify_embeddings(emb, issame).accuracy, 4)
        return results

    # ---- the loop ----------------------------------------------------------------------------

    def train(self) -> dict:
        c = self.config
        bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        sums: dict[str, torch.Tensor] = {}
        count = 0
        last_val: dict = {}
        last_val_step = -1
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="train-fr",
            unit="step",
            disable=not (c.progress and self.is_main),
            dynamic_ncols=True,
        )
        t_log = time.perf_counter()
        while self.step < self.total_steps:
            epoch = self.step // self.steps_per_epoch
            first_step = self.step % self.steps_per_epoch
            for x, labels, _, _ in self.loader.epoch(epoch, first_step):
                lr = lr_at(c, self.step, self.steps_per_epoch)
                for opt in (self.opt_backbone, self.opt_head):
                    for group in opt.param_groups:
                        group["lr"] = lr
                torch.manual_seed(step_seed(c.seed, self.step, "dropout", self.rank))
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    embeddings = self.model(x)
                loss, stats = self.head(embeddings, labels, self.step)
                bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), self.step, bad_step)
                self.opt_backbone.zero_grad(set_to_none=True)
                self.opt_head.zero_grad(set_to_none=True)
                loss.backward()
                if c.clip_grad > 0:
                    torch.nn.utils.clip_grad_norm_(self.backbone_params, c.clip_grad)
                self.opt_backbone.step()
                self.opt_head.step()
                self.step += 1
                for k, v in {"loss": loss.detach(), **stats}.items():
                    sums[k] = sums.get(k, 0.0) + v.float()
                count += 1
                bar.update(1)

                end_of_epoch = self.step % self.steps_per_epoch == 0
                finished = self.step >= self.total_steps
                saving = self.step % c.save_every == 0 or finished
                if self.step % c.log_every == 0 or end_of_epoch or saving:
                    check_finite(bad_step, self.last_checkpoint)
                    now = time.perf_counter()
                    record = {k: round(float(v) / count, 5) for k, v in sums.items()}
                    record.update(
                        step=self.step,
                        epoch=round(self.step / self.steps_per_epoch, 4),
                        lr=float(f"{lr:.12g}"),  # 0.01, not 0.010000000000000002
                        samples_per_s=round(count * self.global_batch / (now - t_log), 1),
                    )
                    self.log(record)
                    bar.set_postfix(loss=record["loss"], lr=f"{lr:.3g}")
                    sums, count, t_log = {}, 0, now
                epochs_done = self.step // self.steps_per_epoch
                if self.val_sets and ((end_of_epoch and epochs_done % c.val_every == 0) or finished):
                    last_val, last_val_step = self.evaluate(), self.step
                    self.log(
                        {
                            "step": self.step,
                            "epoch": round(self.step / self.steps_per_epoch, 4),
                            "val": last_val,
                        }
                    )
                    bar.write(f"step {self.step} (epoch {self.step / self.steps_per_epoch:.2f}): {last_val}")
                if saving:
                    self.save()
                    if self.is_main and not c.progress:  # without a bar, a line per checkpoint
                        print(f"step {self.step}/{self.total_steps}: checkpoint saved", flush=True)
                if saving or last_val_step == self.step:
                    t_log = time.perf_counter()  # the next samples_per_s counts training only
                if finished:
                    break
        bar.close()
        if self.saved_step != self.step:
            self.save()  # a resumed run that had nothing left to do still leaves its final state
        return self.export(last_val)

    # ---- outputs -----------------------------------------------------------------------------

    def export(self, last_val: dict) -> dict:
        prototypes = self.head.full_weight().float().cpu()  # collective
        summary: dict = {"out": str(self.out), "step": self.step, "val": last_val}
        if not self.is_main:
            return summary
        real, virtual = prototypes[: self.num_real], prototypes[self.num_real :]
        backbone_state = {k: v.detach().contiguous().cpu() for k, v in self.backbone.state_dict().items()}
        save_file(backbone_state, self.out / f".{BACKBONE_WEIGHTS}.tmp")
        usual_permissions(self.out / f".{BACKBONE_WEIGHTS}.tmp")
        os.replace(self.out / f".{BACKBONE_WEIGHTS}.tmp", self.out / BACKBONE_WEIGHTS)
        meta = {
            "backbone": self.config.backbone_config().to_dict(),
            "sha256": file_sha256(self.out / BACKBONE_WEIGHTS),
            "step": self.step,
            "num_real": self.num_real,
            "num_virtual": self.config.num_virtual,
            "margin": self.config.margin_config().to_dict(),
            "head_loss": self.head.loss,  # what --loss auto chose
            "train_config": self.config.to_dict(),
        }
        _write_json(self.out / BACKBONE_META, meta)
        # which backbone's feature space they live in: vigface-gen --prototypes checks it
        save_file(
            {"real": real.contiguous(), "virtual": virtual.contiguous()},
            self.out / ".prototypes.tmp",
            metadata={"backbone_sha256": meta["sha256"]},
        )
        usual_permissions(self.out / ".prototypes.tmp")
        os.replace(self.out / ".prototypes.tmp", self.out / "prototypes.safetensors")
        report = {
            "step": self.step,
            "virtual_embeddings": self.config.virtual_embeddings,
            "stats": prototype_stats(real, virtual) if len(virtual) else prototype_stats(real, real[:0]),
            "paper_fig3b": {k: {"mean": m, "std": s} for k, (m, s) in PAPER_FIG3B.items()},
            "sigma_mean": float(self.head.sigma.mean()),
            "val": last_val,
        }
        _write_json(self.out / "prototype_report.json", report)
        ablation = "" if self.config.virtual_embeddings else " (no virtual embeddings)"
        plot_prototype_similarity(
            real,
            virtual,
            self.out / "prototype_similarity.png",
            title=f"prototype cosine, step {self.step}{ablation}",
        )
        summary["prototype_stats"] = report["stats"]
        return summary


def _write_json(path: Path, data: dict) -> None:
    write_atomically(path, json.dumps(data, indent=2))


def train_fr(config: FRTrainConfig, *, resume: bool = False) -> dict:
    """Train (or resume) stage 1; returns a summary (step, last validation, prototype stats)."""
    torch.set_flush_denormal(True)  # subnormals slow x86 CPU arithmetic ~10x (see the diffusion trainer)
    with FolderLock(config.out) as lock:
        summary = _Run(config, resume, lock).train()
    finish_distributed()
    return summary
