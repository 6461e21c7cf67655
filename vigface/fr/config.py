"""Stage-1 training configuration: one dataclass, saved as JSON beside every checkpoint.

Defaults are the paper's MS1M-V2 recipe (§5.1): IResNet-50, ArcFace m = 0.5 s = 64, SGD lr 0.1
momentum 0.9 wd 5e-4, batch 512 (here per rank: 128 x 4 GPUs), lr x0.1 at epochs 10, 18, 22,
25 epochs. CASIA-WebFace: `--scale 30 --lr-steps 24 30 36 --epochs 40`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from vigface.config_types import check_field_types
from vigface.data.files import setting_changed
from vigface.errors import VigfaceError
from vigface.fr.backbone_config import ARCHS, BackboneConfig
from vigface.fr.margin_config import MARGINS, MarginConfig

OPTIMIZERS = ("sgd", "adamw")
AMP_MODES = ("auto", "bf16", "off")
LOSSES = ("auto", "fused", "reference")  # margin-softmax implementation (same loss)
LOADERS = ("torch", "dali", "auto")  # vigface.data.loaders backends

# Fields a resumed run may change: they do not alter the computation of any step ("out": a run
# folder may be moved and resumed where it now is).
RESUMABLE_CHANGES = frozenset(
    {
        "out",
        "epochs",
        "max_steps",
        "workers",
        "save_every",
        "keep_checkpoints",
        "log_every",
        "val",
        "progress",
        "device",
        "loss",
    }
)


@dataclass
class FRTrainConfig:
    data: str = ""  # train.rec, a folder holding train.rec, or an image folder
    out: str = ""
    # backbone
    arch: str = "iresnet50"
    width: int = 64
    input_size: int = 112
    embedding_dim: int = 512
    dropout: float | None = None
    # head
    margin: str = "arcface"
    scale: float = 64.0
    margin_m: float | None = None
    margin_m1: float = 1.0  # combined margin only: cos(m1 theta + m) - m3
    margin_m3: float = 0.2
    num_virtual: int = 0  # k virtual prototypes W_V
    virtual_embeddings: bool = True  # False: the collapse ablation (W_V without eqs. 5-7)
    sigma_alpha: float = 0.9
    loss: str = "auto"  # auto: the reference; the fused kernels on CUDA when its logits would not fit
    # optimisation
    batch_size: int = 128  # per rank
    epochs: int = 25
    max_steps: int | None = None  # stop earlier than `epochs` (benchmarks, smoke runs)
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_steps: list[float] = field(default_factory=lambda: [10, 18, 22])  # epochs where lr *= lr_decay
    lr_decay: float = 0.1
    warmup_epochs: float = 0.0
    clip_grad: float = 5.0  # max backbone grad norm; 0 turns clipping off
    amp: str = "auto"  # auto: bf16 on CUDA, off on CPU
    channels_last: bool | None = None  # None: on for CUDA
    compile: bool = False
    loader: str = "torch"  # torch (reference) | dali (extra `dali`) | auto (dali when installed)
    aligned: bool = True  # False: warp each image to the ArcFace template with its landmarks, on the fly
    landmarks: str | None = None  # aligned=False: the table (default: beside the .rec, or the manifest's)
    flip: bool = True
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda (under torchrun: cuda:<LOCAL_RANK>)
    # bookkeeping
    workers: int = 2
    save_every: int = 1000  # steps
    keep_checkpoints: int = 2
    log_every: int = 10
    val: list[str] = field(default_factory=list)  # verification .bin files evaluated every val_every epochs
    val_every: int = 1
    progress: bool = True

    def __post_init__(self):
        def bad(name, why):
            raise VigfaceError(f"training config: {name} {why}")

        check_field_types(self, "training config")  # from Python, batch_size 2.5 or "8" failed deep inside

        if self.arch not in ARCHS:
            bad("arch", f"{self.arch!r} is unknown; choose one of {', '.join(ARCHS)}")
        if self.margin not in MARGINS:
            bad("margin", f"{self.margin!r} is unknown; choose one of {', '.join(MARGINS)}")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", f"{self.optimizer!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")
        if self.device not in ("auto", "cpu", "cuda"):
            bad("device", f"{self.device!r} is unknown; choose auto, cpu or cuda")
        if self.loss not in LOSSES:
            bad("loss", f"{self.loss!r} is unknown; choose one of {', '.join(LOSSES)}")
        if self.loader not in LOADERS:
            bad("loader", f"{self.loader!r} is unknown; choose one of {', '.join(LOADERS)}")
        if self.amp not in AMP_MODES:
            bad("amp", f"{self.amp!r} is unknown; choose one of {', '.join(AMP_MODES)}")
        for name in (
            "batch_size",
            "epochs",
            "save_every",
            "keep_checkpoints",
            "log_every",
            "width",
            "val_every",
        ):
            if getattr(self, name) < 1:
                bad(name, f"must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            bad("max_steps", f"must be at least 1, got {self.max_steps}")
        if self.num_virtual < 0:
            bad("num_virtual", f"must be >= 0, got {self.num_virtual}")
        if self.workers < 0:
            bad("workers", f"must be >= 0, got {self.workers}")
        for name in ("lr", "weight_decay", "warmup_epochs", "clip_grad", "momentum"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                bad(name, f"must be a finite number >= 0, got {value}")
        if self.landmarks and self.aligned:
            bad(
                "landmarks (--landmarks)",
                "is read only with --no-aligned (aligning on the fly); aligned data needs none",
            )
        if not (math.isfinite(self.lr_decay) and self.lr_decay > 0):
            bad("lr_decay", f"must be a finite number > 0, got {self.lr_decay}")
        for epoch in self.lr_steps:  # a NaN step never fired; a negative one decayed the lr from step 0
            if not (math.isfinite(epoch) and epoch >= 0):
                bad("lr_steps", f"must be finite epochs >= 0, got {epoch}")
        if not 0 < self.sigma_alpha <= 1:
            bad("sigma_alpha", f"must be in (0, 1], got {self.sigma_alpha}")
        self.lr_steps = sorted(float(s) for s in self.lr_steps)
        self.val = [str(v) for v in self.val]
        self.backbone_config()  # validates width / size / dim
        self.margin_config()

    def backbone_config(self) -> BackboneConfig:
        return BackboneConfig(self.arch, self.embedding_dim, self.width, self.input_size, self.dropout)

    def margin_config(self) -> MarginConfig:
        return MarginConfig(
            kind=self.margin, scale=self.scale, margin=self.margin_m,
            combined_m1=self.margin_m1, combined_m3=self.margin_m3,
        )  # fmt: skip

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FRTrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise VigfaceError(f"training config: unknown field(s) {', '.join(unknown)}")
        return cls(**data)

    def changes_from(self, other: FRTrainConfig) -> list[str]:
        """Names of fields that differ and would change the computation."""
        a, b = self.to_dict(), other.to_dict()
        return [k for k in a if setting_changed(k, b[k], a[k]) and k not in RESUMABLE_CHANGES]
