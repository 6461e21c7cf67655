"""Sampling engines: one interface (base.py), one file per engine, chosen by name.

    engine = create_engine("cudagraph", denoiser, schedule, device="cuda", precision="bf16")
    x0 = engine.sample(cond, pose, w, sampler="ddim", steps=100, x_T=noise)

=========  ==============================================================  ===================
name       what runs                                                       precisions
=========  ==============================================================  ===================
eager      the PyTorch module and the reference samplers (the baseline)    fp32 bf16 fp16
compile    torch.compile (max-autotune on CUDA, VIGFACE_COMPILE_MODE)      fp32 bf16 fp16 fp8
           + fused update per step
           (attention= / mlp= kernels in the graph; fp8 scales calibrated)
cudagraph  the whole loop captured in one CUDA graph per (batch, steps)    fp32 bf16 fp16
onnx       the exported graph in onnxruntime (CPU or CUDA EP)              fp32
trt        a TensorRT 10 engine built by vigface-export (sidecar checked)  fp32 bf16 fp16 fp8
auto       the first that can start here, in AUTO_ORDER                    the engine's default
=========  ==============================================================  ===================

Numerics, measured: the FR cosine between an engine's image and eager fp32's for the same seed, on the
toy model (CPU: 20 + 20 ids x 8, DDIM-50, bench/results/engine_drift_toy_cpu.json; H200: 50 + 50 ids x
8, DDIM-100, fast_sampler_identity_toy_gpu.json): compile fp32 1.0000, onnx 1.0000, eager bf16 0.9995,
compile fp8 0.9983 (CPU); cudagraph 1.0000 (H200). fp8 through compile + fast (the fused GELU GEMM) at
DPM-Solver++ logSNR-15 on the H200: 0.9963 to eager DDIM-100, where eager at that sampler has 0.9978
(fast_sampler_identity_toy_gpu_fp8.json / _logsnr.json), and its CST / SEP within 1 % of DDIM-100. At
ViT-B/4 on an H100 / H200 (random weights, sample_throughput_cuda*.json) the mean difference from eager
bf16 in uint8 levels: bf16 engines 0.52-0.80. fp8 in uint8 levels: not measured validly (those rows
started from an earlier row's images, see the JSONs' nineteenth-session note; its FR cosine above
stands). trt: not measured (TensorRT not installable).

Engine modules are imported only when chosen, so onnxruntime / TensorRT stay optional.
`auto` order, by the sample_throughput measurements: on CUDA trt (when a plan for this model
exists), cudagraph, eager (compile is left out of auto: its first call per batch size takes
minutes); on CPU eager (onnxruntime measured 0.65-0.74x eager in an earlier run and 1.07-1.28x in
bench/results/sample_throughput_cpu.json, one thread on a shared machine: no consistent win, and it
needs an export first; compile's 1.2-1.5x does not pay back its minute-long compilation for a short
CPU run).
"""

from __future__ import annotations

import importlib
import inspect
import logging

import torch

from vigface.choices import ENGINES
from vigface.errors import BackendUnavailableError, VigfaceError

log = logging.getLogger("vigface.engines")

_CLASSES = {
    "eager": ("vigface.engines.eager", "EagerEngine"),
    "compile": ("vigface.engines.compile", "CompileEngine"),
    "cudagraph": ("vigface.engines.cudagraph", "CudaGraphEngine"),
    "onnx": ("vigface.engines.onnx", "OnnxEngine"),
    "trt": ("vigface.engines.trt", "TrtEngine"),
}
AUTO_ORDER = {"cuda": ("trt", "cudagraph", "eager"), "cpu": ("eager",)}


def engine_class(name: str):
    if name not in _CLASSES:
        raise VigfaceError(f"engine {name!r} is unknown; choose one of {', '.join(ENGINES)}")
    module, cls = _CLASSES[name]
    return getattr(importlib.import_module(module), cls)


def create_engine(name: str, denoiser, schedule, device="cpu", precision: str | None = None, **options):
    """An engine by name; `options` go to that engine (e.g. plan= for trt, backend= for compile).

    "auto" tries AUTO_ORDER for the device type and takes the first that starts, passing each the
    options it accepts; trt is tried only when a `plan` option is given. An unavailable engine
    raises BackendUnavailableError naming what is missing; "auto" logs what it skipped and chose.
    """
    device = torch.device(device)
    if name != "auto":
        kwargs = dict(options)
        if precision is not None:
            kwargs["precision"] = precision
        return engine_class(name)(denoiser, schedule, device, **kwargs)
    skipped = []
    for candidate in AUTO_ORDER["cuda" if device.type == "cuda" else "cpu"]:
        if candidate == "trt" and options.get("plan") is None:
            skipped.append("trt: no engine plan for this model")
            continue
        accepted = inspect.signature(engine_class(candidate).__init__).parameters
        kwargs = {k: v for k, v in options.items() if k in accepted}  # each engine takes its own options
        try:
            engine = create_engine(candidate, denoiser, schedule, device, precision, **kwargs)
        except (BackendUnavailableError, VigfaceError) as exc:
            skipped.append(f"{candidate}: {exc}")
            continue
        log.info("engine auto -> %s%s", candidate, "".join(f"\n  skipped {s}" for s in skipped))
        return engine
    raise BackendUnavailableError("engine auto: nothing could start:\n  " + "\n  ".join(skipped))
