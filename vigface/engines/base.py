"""The engine interface: a denoiser forward, and a whole guided sampling loop around it.

    engine.denoise(x_t, t, cond, pose)                       -> model output (N, 3, S, S), float32
    engine.sample(cond, pose, w, sampler="ddim", steps=100, x_T=..., generator=...)
                                                             -> final x0 estimate (N, 3, S, S) in [-1, 1]

`denoise` is the raw network (x0 or v, by the config's `prediction`); engines are compared on it
against eager. `sample` runs classifier-free guidance with one batched forward of [cond; uncond]
rows per step (the unconditional half sees a zero condition and a zero pose image, as in
training's condition dropout) and the sampler update. The default loop here calls `denoise` and
the fused guidance + update step (fused_update.py) once per step; engines that own their loop
(eager: the reference samplers; cudagraph: one captured graph) override it.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from vigface.diffusion.denoiser import Denoiser
from vigface.diffusion.denoiser_config import DenoiserConfig
from vigface.diffusion.schedule import NoiseSchedule
from vigface.engines.fused_update import guided_update_, plan_steps
from vigface.errors import VigfaceError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Exportable / capturable plain-PyTorch ops in place of the fused kernels (attention.py, the
# AdaLN option of the Triton-kernels issue); a field the installed config lacks is skipped.
REFERENCE_BACKENDS = {"attention": "sdpa", "adaln": "reference", "mlp": "reference"}
# Every fast path, named explicitly (CUDA; the benchmarks' NAME+fast): Triton attention and AdaLN,
# the cuBLASLt GELU epilogue
FAST_BACKENDS = {"attention": "triton", "adaln": "triton", "mlp": "cublaslt"}


def check_precision(engine: str, precision: str, offered: tuple[str, ...]) -> None:
    if precision not in offered:
        raise VigfaceError(
            f"engine {engine!r}: precision {precision!r} is not offered; choose one of {', '.join(offered)}"
        )


def engine_model(denoiser: Denoiser, device, dtype: torch.dtype = torch.float32) -> Denoiser:
    """The denoiser in eval mode on `device` in `dtype`: itself if it already is, else a copy."""
    p = next(denoiser.parameters())
    if p.device == torch.device(device) and p.dtype == dtype:
        return denoiser.eval()
    return copy.deepcopy(denoiser).to(device=device, dtype=dtype).eval()


def denoiser_with(denoiser: Denoiser, **changes) -> Denoiser:
    """The same weights, device and dtype under a config with `changes` (e.g. attention="triton");
    the denoiser itself when nothing changes."""
    changes = {k: v for k, v in changes.items() if getattr(denoiser.config, k) != v}
    if not changes:
        return denoiser
    try:
        other = Denoiser(dataclasses.replace(denoiser.config, **changes))
    except VigfaceError as exc:
        raise VigfaceError(f"cannot switch the denoiser to {changes}: {exc}") from None
    p = next(denoiser.parameters())
    other.load_state_dict(denoiser.state_dict())
    return other.to(device=p.device, dtype=p.dtype).eval()


def reference_denoiser(denoiser: Denoiser) -> Denoiser:
    """The same weights with every fused-kernel backend switched to its plain-PyTorch reference."""
    names = {f.name for f in dataclasses.fields(denoiser.config)}
    return denoiser_with(denoiser, **{k: v for k, v in REFERENCE_BACKENDS.items() if k in names})


class Engine:
    name = "base"

    def __init__(self, config: DenoiserConfig, schedule: NoiseSchedule, device: torch.device, precision: str):
        self.config = config
        self.schedule = schedule
        self.device = torch.device(device)
        self.precision = precision

    def describe(self) -> dict:
        return {"engine": self.name, "precision": self.precision, "device": str(self.device)}

    def denoise(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, pose: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x_t (N, 3, S, S), t (N,) int64, cond (N, d), pose (N, 5, S, S) or None -> (N, 3, S, S) float32."""
        raise NotImplementedError

    # -- sampling ---------------------------------------------------------------------------------

    def prepare(self, cond, pose, w, x_T, generator):
        """Validated float32 inputs on the engine's device, plus the [cond; uncond] condition and pose."""
        cfg = self.config
        cond = torch.as_tensor(cond)  # (a NumPy array failed on .dim())
        pose = None if pose is None else torch.as_tensor(pose)
        n = cond.shape[0] if cond.dim() else 0
        if cond.dim() != 2 or cond.shape[1] != cfg.cond_dim:
            raise VigfaceError(f"cond must have shape (N, {cfg.cond_dim}), got {tuple(cond.shape)}")
        if cfg.pose and (pose is None or pose.shape != (n, 5, cfg.image_size, cfg.image_size)):
            got = None if pose is None else tuple(pose.shape)
            raise VigfaceError(
                f"pose must have shape ({n}, 5, {cfg.image_size}, {cfg.image_size}), got {got}"
            )
        w = torch.as_tensor(w, dtype=torch.float32)
        w = w.expand(n) if w.dim() == 0 else w
        if w.shape != (n,):
            raise VigfaceError(f"w must be a float or have shape ({n},), got {tuple(w.shape)}")
        for name, value in (("cond", cond), ("pose", pose), ("w", w)):
            if value is not None and not bool(torch.isfinite(torch.as_tensor(value)).all()):
                # NaN passes the final clamp and casts to 0: every image came out black, without a word
                raise VigfaceError(f"{name} holds NaN or infinite values")
        shape = (n, 3, cfg.image_size, cfg.image_size)
        if x_T is None:
            x_T = torch.randn(shape, generator=generator)
        if x_T.shape != shape:
            raise VigfaceError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}")
        dev = self.device
        cond = cond.to(dev, torch.float32)
        cond2 = torch.cat([cond, torch.zeros_like(cond)])
        pose2 = None
        if cfg.pose:
            pose = pose.to(dev, torch.float32)
            pose2 = torch.cat([pose, torch.zeros_like(pose)])
        # a copy: the sampling loops update x in place, and the caller's x_T must stay its noise
        return cond2, pose2, w.to(dev), x_T.to(dev, torch.float32, copy=True)

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        pose: torch.Tensor | None,
        w,
        *,
        sampler: str = "ddim",
        steps: int = 100,
        x_T: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The final x0 estimate (N, 3, S, S) float32 in [-1, 1], on the engine's device."""
        plan = plan_steps(self.schedule, sampler, steps, self.config.prediction)
        cond2, pose2, w, x = self.prepare(cond, pose, w, x_T, generator)
        prev = torch.zeros_like(x)
        for step in plan:
            t = torch.full((2 * x.shape[0],), step.t, dtype=torch.long, device=self.device)
            out = self.denoise(torch.cat([x, x]), t, cond2, pose2)
            guided_update_(out, x, prev, w, step)
        return x
