"""What a generation run makes (vigface-gen's settings): torch-free, so that --help and argument
checks do not wait for torch's import (~2 s on a 2-core CPU). The run: vigface.generate.dataset."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from vigface.choices import DEFAULT_W_REAL, DEFAULT_W_VIRTUAL, ENGINES, KERNELS, PRECISIONS, SAMPLERS
from vigface.errors import VigfaceError

# The paper's datasets: (identities, images per identity).
PRESETS = {"S": (10_000, 50), "B": (60_000, 20), "L": (120_000, 50)}
KINDS = ("real", "virtual", "both")


@dataclass(frozen=True)
class GenerationConfig:
    model: str  # a vigface-train-diffusion output folder
    out: str
    ids: str = "virtual"
    num_ids: int | None = None  # per kind; None: the preset's, else every prototype of that kind
    per_id: int | None = None
    preset: str | None = None
    prototypes: str | None = None  # default: the model folder's copy, else the FR model's
    pose: str = "dataset"  # dataset | frontal | a (M, 5, 2) .npy in the 112x112 aligned frame
    landmarks: str | None = None  # table `pose=dataset` draws from (default: the model's pose_landmarks.npy)
    w_real: float = DEFAULT_W_REAL
    w_virtual: float = DEFAULT_W_VIRTUAL
    steps: int = 100
    sampler: str = "ddim"
    engine: str = "eager"
    precision: str | None = None  # None: the engine's default (fp32); bf16 / fp16 / fp8 where it offers them
    kernels: str = "reference"  # fast: the denoiser's fast paths on CUDA (FaceSampler.load)
    format: str = "rec"
    output_size: int = 112
    quality: int = 95
    batch_size: int = 64
    shard_size: int = 1024  # images per shard (a multiple of batch_size keeps batches whole)
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        def bad(name, why):
            raise VigfaceError(f"generation: --{name.replace('_', '-')} {why}")

        if self.ids not in KINDS:
            bad("ids", f"{self.ids!r} is unknown; choose one of {', '.join(KINDS)}")
        if self.preset is not None and self.preset not in PRESETS:
            bad("preset", f"{self.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
        if self.sampler not in SAMPLERS:
            bad("sampler", f"{self.sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}")
        if self.engine not in ENGINES:
            bad("engine", f"{self.engine!r} is unknown; choose one of {', '.join(ENGINES)}")
        if self.precision is not None and self.precision not in PRECISIONS:
            bad("precision", f"{self.precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
        if self.kernels not in KERNELS:
            bad("kernels", f"{self.kernels!r} is unknown; choose one of {', '.join(KERNELS)}")
        if self.format not in ("rec", "folder"):
            bad("format", f"{self.format!r} is unknown; choose rec or folder")
        for name in ("steps", "batch_size", "shard_size", "output_size", "num_ids", "per_id", "seed"):
            value = getattr(self, name)  # 2.5 failed deep inside; "5" compared as a string
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
                bad(name, f"must be an integer, got {value!r}")
        for name in ("steps", "batch_size", "shard_size", "output_size"):
            if getattr(self, name) < 1:
                bad(name, f"must be at least 1, got {getattr(self, name)}")
        for name in ("num_ids", "per_id"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                bad(name, f"must be at least 1, got {getattr(self, name)}")
        if self.output_size > 2048:  # 10**6 asked for 120 GB
            bad("output_size", f"must be at most 2048, got {self.output_size}")
        if self.device not in ("auto", "cpu", "cuda"):  # "gpu" (or "cuda:1") ran on the CPU
            bad("device", f"{self.device!r} is unknown; choose auto, cpu or cuda (the GPU is LOCAL_RANK's)")
        if not 1 <= self.quality <= 100:
            bad("quality", f"must be a JPEG quality in [1, 100], got {self.quality}")
        # the per-image seed mixes (seed, prototype * 1,000,003 + image) into 32 bits (_job_seed)
        if not 0 <= self.seed < 2**32:
            bad("seed", f"must be in [0, 2**32), got {self.seed} (larger seeds repeat smaller ones)")
        if self.per_id is not None and self.per_id >= 1_000_003:
            bad("per_id", f"must be under 1,000,003 (the image index of a seed), got {self.per_id}")
        # eq. 9: w = 0 is unconditional, 1 conditional, > 1 guided; NaN would make every image NaN
        for name in ("w_real", "w_virtual"):
            if not np.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                bad(name, f"must be a finite number >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)
