"""Stage-2 training configuration, saved as JSON beside every checkpoint.

Defaults follow the paper's §4.2 on a GPU: U-ViT-B/4 at 112x112 (784 tokens), x0 prediction,
cosine schedule with T = 1000, condition dropped 10 % of the time, AdamW lr 1e-4, EMA 0.9999.
For CPU runs: `--size tiny` (d128, 5 blocks, patch 8 at 56x56).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

from vigface.choices import MAX_TIMESTEPS, SCHEDULES
from vigface.config_types import check_field_types
from vigface.data.files import setting_changed
from vigface.diffusion.denoiser_config import ARCHS, DENOISER_SIZES, PREDICTIONS, DenoiserConfig
from vigface.errors import VigfaceError

if TYPE_CHECKING:  # torch: imported when a run builds the schedule, not for --help
    from vigface.diffusion.schedule import NoiseSchedule

LR_DECAYS = ("none", "cosine")
RESUMABLE_CHANGES = frozenset(
    {"steps", "workers", "save_every", "keep_checkpoints", "log_every", "progress", "device"}
    | {"out"}  # a run folder may be moved and resumed where it now is
    | {"cache_conditions"}  # the same numbers either way (condition_cache)
)


@dataclass
class DiffusionTrainConfig:
    data: str = ""  # train.rec (or a folder holding it, or an image folder with manifest landmarks)
    landmarks: str | None = None  # (N, 5, 2) .npy in dataset order; default <rec stem>_landmarks.npy
    fr_model: str = ""  # a vigface-train-fr output folder: the frozen backbone giving f(x0)
    out: str = ""
    # denoiser
    size: str = "B"
    arch: str = "uvit"
    image_size: int | None = None  # None: the size preset's
    patch: int | None = None  # None: the size preset's
    pose: bool = True
    final_conv: bool = False  # a 3x3 conv after unpatchify, as U-ViT has
    cond_scale: float = 1.0  # the FR embedding times this before its projection (DenoiserConfig)
    prediction: str = "x0"
    attention: str = "sdpa"  # sdpa | triton | flash | auto
    adaln: str = "reference"  # reference | triton | auto (fused Triton LayerNorm + modulate)
    # diffusion
    schedule: str = "cosine"
    timesteps: int = 1000
    identity_weight: float = 1.0  # lambda of eq. 8
    drop_prob: float = 0.1  # condition dropout for classifier-free guidance
    # Beyond the paper (0 = its stage 2): weight of the virtual-identity term (diffusion_loss's `virtual`)
    virtual_weight: float = 0.0
    virtual_batch: int = 0  # rows per step for that term; 0 = batch_size // 4
    # optimisation
    batch_size: int = 64  # per rank
    steps: int = 100000
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_decay: str = "none"  # none | cosine: after the warm-up, lr follows a half cosine to 0 at `steps`
    clip_grad: float = 1.0
    ema_decay: float = 0.9999  # upper bound, reached after a warm-up (trainer.ema_decay_at)
    amp: str = "auto"
    compile: bool = False  # torch.compile the denoiser (Inductor); not bit-equal to eager
    # f(x0) of each training image computed once, not every epoch (condition_cache; same numbers)
    cache_conditions: bool = True
    loader: str = "torch"  # torch | dali | auto: vigface.data.loaders
    seed: int = 0
    device: str = "auto"
    # bookkeeping
    workers: int = 2
    save_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    progress: bool = True
    extra: dict = field(default_factory=dict)  # free-form notes carried into the checkpoint

    def __post_init__(self):
        def bad(name, why):
            raise VigfaceError(f"diffusion config: {name} {why}")

        check_field_types(self, "diffusion config")  # from Python, batch_size 2.5 or "8" failed deep inside

        if self.size not in DENOISER_SIZES:
            bad("size", f"{self.size!r} is unknown; choose one of {', '.join(DENOISER_SIZES)}")
        if self.arch not in ARCHS:
            bad("arch", f"{self.arch!r} is unknown; choose one of {', '.join(ARCHS)}")
        if self.prediction not in PREDICTIONS:
            bad("prediction", f"{self.prediction!r} is unknown; choose one of {', '.join(PREDICTIONS)}")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"{self.schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
        if self.lr_decay not in LR_DECAYS:
            bad("lr_decay", f"{self.lr_decay!r} is unknown; choose one of {', '.join(LR_DECAYS)}")
        if self.loader not in ("torch", "dali", "auto"):
            bad("loader", f"{self.loader!r} is unknown; choose torch, dali or auto")
        if self.amp not in ("auto", "bf16", "off"):
            bad("amp", f"{self.amp!r} is unknown; choose auto, bf16 or off")
        if self.device not in ("auto", "cpu", "cuda"):
            bad("device", f"{self.device!r} is unknown; choose auto, cpu or cuda")
        for name in ("batch_size", "steps", "save_every", "keep_checkpoints", "log_every", "timesteps"):
            if getattr(self, name) < 1:
                bad(name, f"must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "identity_weight", "clip_grad", "virtual_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                bad(name, f"must be a finite number >= 0, got {value}")
        if self.warmup_steps < 0:
            bad("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if self.virtual_batch < 0:
            bad("virtual_batch", f"must be >= 0 (0 = batch_size // 4), got {self.virtual_batch}")
        if not 0 <= self.drop_prob < 1:
            bad("drop_prob", f"must be in [0, 1), got {self.drop_prob}")
        if not 0 <= self.ema_decay < 1:
            bad("ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        if not 2 <= self.timesteps <= MAX_TIMESTEPS:  # 10**9 built 8 GB schedule tables
            bad("timesteps", f"must be in 2..{MAX_TIMESTEPS}, got {self.timesteps}")
        self.denoiser_config()

    def denoiser_config(self) -> DenoiserConfig:
        overrides = {
            "arch": self.arch,
            "pose": self.pose,
            "final_conv": self.final_conv,
            "cond_scale": self.cond_scale,
            "prediction": self.prediction,
            "attention": self.attention,
            "adaln": self.adaln,
        }
        if self.image_size is not None:
            overrides["image_size"] = self.image_size
        if self.patch is not None:
            overrides["patch"] = self.patch
        return DenoiserConfig.preset(self.size, **overrides)

    def learning_rate(self, step: int) -> float:
        """The lr of 0-based `step`: linear warm-up over `warmup_steps`, then constant or a half
        cosine that reaches 0 at `steps`. Resuming with more `steps` stretches the cosine. (On the
        toy demo it did not beat constant lr + EMA: bench/results/demo_toy_cpu.json, "stage2_budget".)"""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.lr_decay == "none":
            return self.lr
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def noise_schedule(self) -> NoiseSchedule:
        from vigface.diffusion.schedule import NoiseSchedule

        return NoiseSchedule(self.schedule, self.timesteps)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DiffusionTrainConfig:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise VigfaceError(f"diffusion config: unknown field(s) {', '.join(unknown)}")
        return cls(**data)

    def changes_from(self, other: DiffusionTrainConfig) -> list[str]:
        a, b = self.to_dict(), other.to_dict()
        return [k for k in a if setting_changed(k, b[k], a[k]) and k not in RESUMABLE_CHANGES]
