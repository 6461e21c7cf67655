"""The compile engine: the denoiser through torch.compile (Inductor), optionally with fp8 linears.

    mode "max-autotune" on CUDA (Triton GEMM/attention autotuning; the first call of each batch
    shape takes minutes at ViT-B), the default mode on CPU, where max-autotune only adds time;
    the environment variable VIGFACE_COMPILE_MODE overrides that choice (e.g. "default" on CUDA).
    fullgraph=True: a graph break would silently fall back to Python per op, so it is an error.
    dynamic=False: one specialised graph per batch size; generation uses one or two sizes.

Kernels inside the graph: attention "sdpa" (torch's fused attention, which Inductor keeps as one
op) or "triton" (the Triton flash-attention kernel as the custom op vigface::flash_attention,
opaque to Inductor); mlp "reference" or "cublaslt" (the first MLP Linear + GELU as one cuBLASLt
GEMM with a GELU epilogue, CUDA only; Inductor keeps the op as an external kernel; in fp8, where
_scaled_mm has no GELU epilogue, the Triton fp8 GEMM with the GELU and the second linear's input
quantisation in its epilogue, the custom op vigface::fp8_gelu_gemm). The LayerNorm + modulate steps
are always the PyTorch reference here, for Inductor to fuse.

Precisions: fp32, bf16, fp16 (weights cast), and fp8: the transformer blocks' linears in e4m3
through torch._scaled_mm (fp8.py) on top of bf16 (CUDA, sm_89+) or float32 (CPU, numbers only).
fp8_scaling "static" (default): the engine's first call (a `sample` or a `denoise`) runs the model
uncompiled with dynamic per-call activation scales while recording each linear's largest input,
then fixes the scales (fp8_headroom x that) and every later call runs the compiled static graph;
"dynamic": every call computes its activations' scales (an extra reduction pass per linear).
Either way fp8 images are not a function of their own seed alone: static scales come from the
first call's inputs, dynamic ones from each call's batch; so vigface-gen's "an image does not
depend on its batch" and byte-identical resume hold for fp32 / bf16 / fp16 only.
The sampling loop is the base engine's: one compiled forward + the fused update per step.
"""

from __future__ import annotations

import copy
import os

import torch

from vigface.diffusion.denoiser import Denoiser
from vigface.diffusion.schedule import NoiseSchedule
from vigface.engines.base import (
    DTYPES,
    Engine,
    check_precision,
    denoiser_with,
    engine_model,
    reference_denoiser,
)
from vigface.engines.fp8 import calibrate_fp8, convert_block_linears_to_fp8, fp8_supported
from vigface.errors import BackendUnavailableError, VigfaceError

ATTENTION = ("sdpa", "triton")
# the denoiser backends the engine takes as options: the LayerNorm steps (adaln) stay for Inductor
KERNEL_OPTIONS = ("attention", "mlp")
FP8_SCALING = ("static", "dynamic")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class CompileEngine(Engine):
    name = "compile"
    precisions = ("fp32", "bf16", "fp16", "fp8")

    def __init__(
        self,
        denoiser: Denoiser,
        schedule: NoiseSchedule,
        device="cpu",
        precision: str = "fp32",
        backend: str = "inductor",
        mode: str | None = None,
        attention: str = "sdpa",
        mlp: str = "reference",
        fp8_scaling: str = "static",
        fp8_headroom: float = 2.0,
    ):
        check_precision(self.name, precision, self.precisions)
        if attention not in ATTENTION:
            raise VigfaceError(
                f"engine 'compile': attention {attention!r} is unknown; choose one of {', '.join(ATTENTION)}"
            )
        if fp8_scaling not in FP8_SCALING:
            raise VigfaceError(
                f"engine 'compile': fp8_scaling {fp8_scaling!r} is unknown; "
                f"choose one of {', '.join(FP8_SCALING)}"
            )
        if not fp8_headroom >= 1:
            raise VigfaceError(f"engine 'compile': fp8_headroom must be >= 1, got {fp8_headroom}")
        super().__init__(denoiser.config, schedule, device, precision)
        if precision == "fp8":
            ok, why = fp8_supported(self.device)
            if not ok:
                raise BackendUnavailableError(f"engine 'compile' precision 'fp8': {why}")
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            self.dtype = DTYPES[precision]
        if attention == "triton":
            _check_triton_attention(self.device)
        if mlp == "cublaslt" and self.device.type != "cuda":
            raise BackendUnavailableError(
                f"engine 'compile' mlp 'cublaslt' needs a CUDA device, got {self.device}"
            )
        model = denoiser_with(reference_denoiser(denoiser), attention=attention, mlp=mlp)
        model = engine_model(model, self.device, self.dtype)
        if precision == "fp8":
            if mlp == "cublaslt":
                _check_fp8_gelu_gemm()
            model = _fp8_copy(model, fused_mlp=mlp == "cublaslt")
        self.model = model
        if mode is None:
            mode = default_mode(backend, self.device)
        self.backend, self.mode, self.attention, self.mlp = backend, mode, attention, mlp
        self.compiled = torch.compile(model, backend=backend, mode=mode, fullgraph=True, dynamic=False)
        self.fp8_scaling, self.fp8_headroom = fp8_scaling, fp8_headroom
        self.needs_calibration = precision == "fp8" and fp8_scaling == "static"
        self._uncompiled = False  # True while the calibration call runs

    def describe(self) -> dict:
        return {
            **super().describe(),
            "backend": self.backend,
            "mode": self.mode,
            "attention": self.attention,
            "mlp": self.mlp,
            **(
                {"fp8_scaling": self.fp8_scaling, "fp8_headroom": self.fp8_headroom}
                if self.precision == "fp8"
                else {}
            ),
        }

    def _calibrating(self, run):
        """run() uncompiled with dynamic fp8 scales, then the scales fixed (calibrate_fp8)."""
        self._uncompiled = True
        try:
            result = calibrate_fp8(self.model, run, self.fp8_headroom)
        finally:
            self._uncompiled = False
        self.needs_calibration = False
        return result

    @torch.no_grad()
    def denoise(self, x_t, t, cond, pose=None):
        if self.needs_calibration and not self._uncompiled:
            return self._calibrating(lambda: self.denoise(x_t, t, cond, pose))
        model = self.model if self._uncompiled else self.compiled
        p = None if pose is None else pose.to(self.dtype)
        # a copy: under max-autotune's CUDA graphs the output lives in memory the next replay reuses
        return model(x_t.to(self.dtype), t, cond.to(self.dtype), p).to(torch.float32, copy=True)

    def sample(self, *args, **kwargs):
        if self.needs_calibration and not self._uncompiled:
            return self._calibrating(lambda: super(CompileEngine, self).sample(*args, **kwargs))
        return super().sample(*args, **kwargs)


def default_mode(backend: str, device: torch.device) -> str | None:
    """The torch.compile mode when none is given: VIGFACE_COMPILE_MODE if set (max-autotune spends
    minutes autotuning each GEMM shape on a GPU, once per batch size; "default" skips that), else
    max-autotune for Inductor on CUDA and torch's default elsewhere."""
    chosen = os.environ.get("VIGFACE_COMPILE_MODE", "")
    if chosen:
        if chosen not in COMPILE_MODES:
            raise VigfaceError(f"VIGFACE_COMPILE_MODE={chosen!r}: choose one of {', '.join(COMPILE_MODES)}")
        return chosen
    return "max-autotune" if backend == "inductor" and device.type == "cuda" else None


def fast_kernel_options(device, precision: str | None) -> dict:
    """The compile engine's options for `kernels="fast"` (FaceSampler.load, vigface-gen): on CUDA the
    cuBLASLt GELU MLP, and the Triton attention for 16-bit and fp8 (as the denoiser's attention "auto"
    chooses); Inductor fuses the LayerNorm + modulate steps itself. Off CUDA: none (the reference)."""
    if torch.device(device).type != "cuda":
        return {}
    sixteen_bit = precision in ("bf16", "fp16", "fp8")
    return {"attention": "triton" if sixteen_bit else "sdpa", "mlp": "cublaslt"}


def compile_options(backends: dict) -> dict:
    """The part of denoiser backend choices (e.g. FAST_BACKENDS) that the compile engine takes."""
    return {k: v for k, v in backends.items() if k in KERNEL_OPTIONS}


def _check_triton_attention(device: torch.device) -> None:
    try:
        from vigface.kernels import flash_attention
    except ImportError as exc:
        raise BackendUnavailableError(f"engine 'compile' attention 'triton' needs triton ({exc})") from None
    if device.type != "cuda" and not flash_attention.INTERPRET:
        raise BackendUnavailableError(
            f"engine 'compile' attention 'triton' needs a CUDA device, got {device} "
            "(or TRITON_INTERPRET=1, the slow interpreter)"
        )


def _check_fp8_gelu_gemm() -> None:
    try:
        import vigface.kernels.fp8_gelu_gemm  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError(
            f"engine 'compile' precision 'fp8' with mlp 'cublaslt' needs triton for its fused GELU GEMM "
            f"({exc})"
        ) from None


def _fp8_copy(model: Denoiser, fused_mlp: bool) -> Denoiser:
    model = copy.deepcopy(model)
    if convert_block_linears_to_fp8(model, fused_mlp) == 0:
        raise BackendUnavailableError(
            "engine 'compile' precision 'fp8': no linear of this denoiser has widths that are multiples of 16"
        )
    return model
