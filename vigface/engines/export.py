"""Denoiser -> ONNX: the graph the onnx engine runs and TensorRT builds from.

    inputs   x_t (B, 3, S, S) float32, t (B,) int64, cond (B, d) float32 [, pose (B, 5, S, S) float32]
    output   out (B, 3, S, S) float32           (the x0 or v estimate, as the denoiser predicts)
    batch B is dynamic; opset >= 17 (LayerNormalization is an ONNX op from 17 on)

The fused-kernel backends are switched to their plain-PyTorch reference ops first (base.py's
reference_denoiser), since a Triton kernel has no ONNX form. `dtype` bfloat16 / float16 exports a
network whose weights and internal tensors have that type while its inputs and outputs stay
float32 (casts at both ends): the "strongly typed" input TensorRT takes its precision from.

Exporter: torch.onnx.export(dynamo=True) (torch.export + onnxscript) when onnxscript is
installed and the opset is 18 or above, else, or when it fails, the TorchScript-based exporter
(dynamo=False). Which one ran is returned, so callers can record it.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import warnings

import torch
from torch import nn

from vigface.choices import DEFAULT_OPSET, EXPORTERS
from vigface.diffusion.denoiser import Denoiser
from vigface.engines.base import reference_denoiser
from vigface.errors import BackendUnavailableError, VigfaceError

log = logging.getLogger("vigface.engines")
MIN_OPSET = 17
# torch's dynamo exporter writes opset 18 at least: asked for 17, it wrote 18 (after a logged
# traceback of the down-conversion it tried) and the sidecar said 17.
DYNAMO_MIN_OPSET = 18


def max_opset() -> int:
    """The highest opset torch's ONNX exporters know here (23 in torch 2.13). Above it the dynamo
    exporter wrote graphs onnxruntime could not load and the TorchScript one raised."""
    from torch.onnx import _constants

    return int(getattr(_constants, "ONNX_MAX_OPSET", 20))


class _TypedDenoiser(nn.Module):
    """float32 in, float32 out, the network itself in `dtype`."""

    def __init__(self, denoiser: Denoiser, dtype: torch.dtype):
        super().__init__()
        self.net, self.dtype = denoiser, dtype

    def forward(self, x_t, t, cond, pose=None):
        p = None if pose is None else pose.to(self.dtype)
        return self.net(x_t.to(self.dtype), t, cond.to(self.dtype), p).float()


def input_names(denoiser: Denoiser) -> list[str]:
    return ["x_t", "t", "cond"] + (["pose"] if denoiser.config.pose else [])


def example_inputs(denoiser: Denoiser, batch: int = 2, seed: int = 0, device="cpu") -> tuple:
    """Random inputs of the exported signature (float32, int64 timesteps across the schedule)."""
    cfg, g = denoiser.config, torch.Generator().manual_seed(seed)
    s = cfg.image_size
    x = torch.randn(batch, 3, s, s, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    cond = torch.randn(batch, cfg.cond_dim, generator=g)
    inputs = (x, t, cond) + ((torch.rand(batch, 5, s, s, generator=g),) if cfg.pose else ())
    return tuple(v.to(device) for v in inputs)


def state_sha256(denoiser: Denoiser) -> str:
    """sha256 of the config and every weight's bytes: names the exact model an engine was built from."""
    h = hashlib.sha256(repr(sorted(denoiser.config.to_dict().items())).encode())
    for name, tensor in sorted(denoiser.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def export_onnx(
    denoiser: Denoiser,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
    dtype: torch.dtype = torch.float32,
) -> tuple[bytes, str]:
    """The ONNX model as bytes (weights inside, one file) and the exporter that made it."""
    if exporter not in EXPORTERS:
        raise VigfaceError(f"exporter {exporter!r} is unknown; choose one of {', '.join(EXPORTERS)}")
    if not MIN_OPSET <= opset <= max_opset():
        raise VigfaceError(
            f"opset must be in {MIN_OPSET}..{max_opset()} (LayerNormalization; the highest torch's "
            f"exporters know here), got {opset}"
        )
    net = reference_denoiser(denoiser)
    if _param(net).dtype != dtype or _param(net).device.type != "cpu":
        net = copy.deepcopy(net).to("cpu", dtype)  # never move or cast the caller's model
    net = _TypedDenoiser(net.eval(), dtype)
    args = example_inputs(denoiser)
    names = input_names(denoiser)
    errors = []
    if exporter == "dynamo" and opset < DYNAMO_MIN_OPSET:
        raise VigfaceError(
            f"the dynamo exporter writes opset {DYNAMO_MIN_OPSET} or above, not {opset}; pass "
            f"--exporter legacy for opset {opset}"
        )
    if exporter == "dynamo" or (exporter == "auto" and opset >= DYNAMO_MIN_OPSET):
        try:
            graph = _export_dynamo(net, args, names, opset)
        except Exception as exc:  # ImportError without onnxscript, or an op torch.export cannot trace
            if exporter == "dynamo":
                raise BackendUnavailableError(f"the dynamo ONNX exporter failed: {exc}") from exc
            errors.append(f"dynamo: {type(exc).__name__}: {str(exc)[:200]}")
            log.info("dynamo ONNX export failed (%s); using the TorchScript exporter", errors[-1])
        else:
            written = graph_opset(graph)
            if written in (None, opset):
                return graph, "dynamo"
            if exporter == "dynamo":
                raise VigfaceError(
                    f"the dynamo exporter writes opset {written}, not the {opset} asked for; pass "
                    f"--exporter legacy for opset {opset}, or --opset {written}"
                )
            log.info("the dynamo exporter wrote opset %s, not %s; using the TorchScript one", written, opset)
    return _export_legacy(net, args, names, opset), "legacy"


def graph_opset(onnx_bytes: bytes) -> int | None:
    """The default-domain opset an ONNX graph declares (None without the onnx package to read it)."""
    try:
        import onnx
    except ImportError:
        return None
    model = onnx.load_model_from_string(onnx_bytes)
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _param(module: nn.Module) -> torch.Tensor:
    return next(module.parameters())


def _export_dynamo(net, args, names, opset) -> bytes:
    import onnxscript  # noqa: F401  (the dynamo exporter needs it; fail early and clearly)

    batch = torch.export.Dim("batch", min=1, max=4096)
    shapes = {name: {0: batch} for name in names}
    # Without torchvision the exporter logs a warning per torchvision op it will not register (nms,
    # roi_align, ...): none is in the denoiser, so they would only be noise, even under --quiet.
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                net, args, input_names=names, output_names=["out"], opset_version=opset, dynamo=True,
                dynamic_shapes=shapes, external_data=False, verbose=False,
            )  # fmt: skip
    finally:
        onnx_log.setLevel(level)
    return program.model_proto.SerializeToString()


def _export_legacy(net, args, names, opset) -> bytes:
    buffer = io.BytesIO()
    axes = {name: {0: "batch"} for name in [*names, "out"]}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, args, buffer, input_names=names, output_names=["out"], opset_version=opset, dynamo=False,
            dynamic_axes=axes,
        )  # fmt: skip
    return buffer.getvalue()


def onnxruntime_max_error(onnx_bytes: bytes, denoiser: Denoiser, batches=(1, 3)) -> float:
    """Largest |onnxruntime - torch| over random inputs at each batch size (CPU, float32 torch)."""
    return onnxruntime_errors(onnx_bytes, denoiser, batches)[0]


def onnxruntime_errors(onnx_bytes: bytes, denoiser: Denoiser, batches=(1, 3)) -> tuple[float, float]:
    """(largest |onnxruntime - torch|, RMS of the difference / RMS of torch's output) over random
    inputs at each batch size (CPU, float32 torch). The relative figure judges a graph of unknown
    precision: a reduced-precision export of the same weights stays within a few per cent."""
    from vigface.engines.onnx import import_onnxruntime

    ort = import_onnxruntime()
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    net = reference_denoiser(denoiser)
    if _param(net).dtype != torch.float32 or _param(net).device.type != "cpu":
        net = copy.deepcopy(net).to("cpu", torch.float32)
    worst, squared_error, squared_signal = 0.0, 0.0, 0.0
    for i, batch in enumerate(batches):
        args = example_inputs(denoiser, batch, seed=100 + i)
        feed = {name: v.numpy() for name, v in zip(input_names(denoiser), args, strict=True)}
        got = torch.from_numpy(session.run(["out"], feed)[0]).float()
        with torch.no_grad():
            want = net.eval()(*args).float()
        worst = max(worst, (got - want).abs().max().item())
        squared_error += (got - want).double().pow(2).sum().item()
        squared_signal += want.double().pow(2).sum().item()
    return worst, (squared_error / max(squared_signal, 1e-30)) ** 0.5
