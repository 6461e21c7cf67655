"""Sampling faces from a trained denoiser: load it, condition on prototypes, guide, decode to uint8.

    sampler = FaceSampler.load("runs/diffusion", device="cuda", engine="cudagraph")
    images = sampler.sample(cond, pose, w, seeds)      # uint8 (N, S, S, 3)

The sampling loop runs in an engine (vigface.engines: eager | compile | cudagraph | onnx | trt |
auto); the images come out in the same format whichever runs it. `load` finds the artifacts
vigface-export wrote into <model>/engines/ (denoiser.onnx, denoiser.plan, each with its sidecar).
`kernels="fast"` runs the denoiser's fast paths where the device has them (CUDA: the Triton
attention and AdaLN kernels, the cuBLASLt GELU epilogue; meant for bf16 / fp16), "reference" the
plain PyTorch ops; the weights are the same, the images differ by rounding only.

Deterministic per image: x_T comes from a generator seeded by that image's own seed, and the
samplers offered here (DDIM with eta = 0, DPM-Solver++(2M)) add no noise afterwards, so an image
is the same face whichever images share its batch. Not always the same bits: a matmul's blocking
follows the batch size, so a few images differ by a level or two after JPEG between batch sizes
(3 of 30 between batch 1 and 4 in a review's probe; vigface-gen records the batch size in its plan
and refuses a resume with another). On a CPU with several threads MKL's results can also differ
between processes (one image of 4 in ~15 % of fresh processes, 2 threads; never with 1 thread or
MKL_CBWR=COMPATIBLE, which costs ~8x in matmul time), so a resumed vigface-gen run is
byte-identical to an uninterrupted one only where the kernels are (1 CPU thread, or a GPU).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from vigface.choices import ENGINES, KERNELS, SAMPLERS
from vigface.device import resolve_device
from vigface.diffusion.denoiser import Denoiser, DenoiserConfig
from vigface.diffusion.model_folder import DENOISER_META, DENOISER_WEIGHTS, read_denoiser_meta, read_schedule
from vigface.diffusion.schedule import NoiseSchedule
from vigface.engines import create_engine
from vigface.errors import BackendUnavailableError, DataFormatError, VigfaceError, VigfaceWarning

__all__ = ["ENGINES", "KERNELS", "SAMPLERS", "FaceSampler", "engine_artifacts"]
# kernels="fast": the denoiser's runtime choices (each "auto" picks its fast path on CUDA)
FAST_CONFIG = {"attention": "auto", "adaln": "auto", "mlp": "auto"}


def engine_artifacts(model_dir: str | os.PathLike) -> dict:
    """Where vigface-export puts its outputs for a model folder (they may not exist)."""
    root = Path(model_dir) / "engines"
    return {"onnx": root / "denoiser.onnx", "trt": root / "denoiser.plan"}


class FaceSampler:
    def __init__(
        self,
        denoiser: Denoiser,
        schedule: NoiseSchedule,
        meta: dict | None = None,
        engine: str = "eager",
        precision: str | None = None,
        **engine_options,
    ):
        self.denoiser = denoiser.eval()
        self.schedule = schedule
        self.meta = meta or {}
        device = next(denoiser.parameters()).device
        self.engine = create_engine(engine, self.denoiser, schedule, device, precision, **engine_options)

    @classmethod
    def load(
        cls,
        model_dir: str | os.PathLike,
        device: str | torch.device = "cpu",
        engine: str = "eager",
        precision: str | None = None,
        kernels: str = "reference",
    ) -> FaceSampler:
        if engine not in ENGINES:
            raise BackendUnavailableError(f"engine {engine!r} is unknown; choose one of {', '.join(ENGINES)}")
        if kernels not in KERNELS:
            raise VigfaceError(f"kernels {kernels!r} is unknown; choose one of {', '.join(KERNELS)}")
        if kernels == "fast" and engine in ("onnx", "trt"):  # their graph is fixed when exported
            raise VigfaceError(
                f"kernels 'fast' (--kernels fast) does not apply to engine {engine!r}: its graph is fixed "
                "when exported, with the reference kernels; use it with eager, compile or cudagraph"
            )
        device = resolve_device(device)  # "gpu" or a missing CUDA: one line, not torch's traceback
        if kernels == "fast" and not device.startswith("cuda"):  # the reference paths ran without a word
            warnings.warn(
                VigfaceWarning(
                    "--kernels fast: the fast paths are CUDA kernels; on the CPU the reference ones run "
                    "(the same images)"
                ),
                stacklevel=2,
            )
        model_dir = Path(model_dir)
        meta_path, weights = model_dir / DENOISER_META, model_dir / DENOISER_WEIGHTS
        meta = read_denoiser_meta(model_dir)  # the folder's files, a JSON object
        try:
            config = DenoiserConfig(**meta["denoiser"])
            if kernels == "fast":
                config = dataclasses.replace(config, **FAST_CONFIG)
        except (KeyError, TypeError) as exc:
            raise DataFormatError(meta_path, f"not a valid denoiser description ({exc})") from None
        schedule = read_schedule(model_dir, meta)
        model = Denoiser(config)
        try:
            model.load_state_dict(load_file(weights))
        except Exception as exc:  # safetensors' own error type, or a shape mismatch
            raise DataFormatError(weights, f"cannot be loaded into the described denoiser: {exc}") from None
        artifacts, options = engine_artifacts(model_dir), {}
        if engine in ("trt", "auto") and (engine == "trt" or artifacts["trt"].is_file()):
            options["plan"] = artifacts["trt"]
        if engine == "onnx" and artifacts["onnx"].is_file():
            options["onnx_path"] = artifacts["onnx"]
        if engine == "compile" and kernels == "fast":
            from vigface.engines.compile import fast_kernel_options  # engine modules load when chosen

            options.update(fast_kernel_options(device, precision))
        return cls(model.to(device), schedule, meta, engine, precision, **options)

    @property
    def config(self) -> DenoiserConfig:
        return self.denoiser.config

    def initial_noise(self, seeds: list[int]) -> torch.Tensor:
        s = self.config.image_size
        if not all(isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) for seed in seeds):
            raise VigfaceError(f"seeds must be integers (one per image), got {list(seeds)[:4]}")
        if not all(0 <= seed < 2**64 for seed in seeds):  # what torch.Generator.manual_seed takes
            raise VigfaceError(f"seeds must be in [0, 2**64), got {[int(x) for x in seeds][:4]}")
        return torch.stack(
            [torch.randn(3, s, s, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds]
        )

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        pose: torch.Tensor | None,
        w: torch.Tensor,
        seeds: list[int],
        *,
        steps: int = 100,
        sampler: str = "ddim",
    ) -> np.ndarray:
        """uint8 (N, S, S, 3) faces for conditions (N, d), pose images (N, 5, S, S), guidance w (N,)."""
        if sampler not in SAMPLERS:
            raise VigfaceError(f"sampler {sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}")
        cond = torch.as_tensor(cond)
        if cond.dim() != 2 or len(seeds) != cond.shape[0]:
            raise VigfaceError(
                f"cond must be (N, d) with one seed per row, got {tuple(cond.shape)} and {len(seeds)} seeds"
            )
        if cond.shape[0] == 0:
            return np.zeros((0, self.config.image_size, self.config.image_size, 3), dtype=np.uint8)
        x0 = self.engine.sample(cond, pose, w, sampler=sampler, steps=steps, x_T=self.initial_noise(seeds))
        images = ((x0.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).cpu().numpy()
