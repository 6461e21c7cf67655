"""The onnx engine: the exported denoiser (export.py) run by onnxruntime, CPU or CUDA execution provider.

On CPU the inputs go in as NumPy views of the torch tensors; on CUDA they are bound in place
through an IOBinding (device pointers, no host round trip). The exported graph is float32, so the
only precision is fp32 (reduced precision on GPUs is the trt engine's business).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from vigface.choices import DEFAULT_OPSET
from vigface.diffusion.denoiser import Denoiser
from vigface.diffusion.schedule import NoiseSchedule
from vigface.engines.base import Engine, check_precision
from vigface.engines.export import export_onnx, input_names, state_sha256
from vigface.engines.sidecar import check_sidecar, read_sidecar
from vigface.errors import BackendUnavailableError, DataFormatError, first_line

log = logging.getLogger("vigface.engines")


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailableError(
            "engine 'onnx' needs onnxruntime, which is not installed (pip install 'vigface[onnx]')"
        ) from None
    return onnxruntime


class OnnxEngine(Engine):
    name = "onnx"
    precisions = ("fp32",)

    def __init__(
        self,
        denoiser: Denoiser,
        schedule: NoiseSchedule,
        device="cpu",
        precision: str = "fp32",
        onnx_path: str | Path | None = None,
        exporter: str = "auto",
        opset: int = DEFAULT_OPSET,
    ):
        check_precision(self.name, precision, self.precisions)
        super().__init__(denoiser.config, schedule, device, precision)
        ort = import_onnxruntime()
        if onnx_path is not None:  # a vigface-export file: only for the weights it was exported from
            facts = read_sidecar(onnx_path)
            check_sidecar(onnx_path, facts, {"model_sha256": state_sha256(denoiser)})
            if facts.get("dtype") not in (None, "float32"):  # a TensorRT input of reduced precision
                raise DataFormatError(
                    onnx_path,
                    f"a {facts['dtype']} graph (a TensorRT build's input); the onnx engine runs float32 "
                    "graphs: re-export it with vigface-export --model M",
                )
            model, self.exporter = Path(onnx_path).read_bytes(), facts.get("exporter", "file")
        else:
            model, self.exporter = export_onnx(denoiser, opset=opset, exporter=exporter)
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailableError(
                    "engine 'onnx' on CUDA needs onnxruntime-gpu (the CUDA execution provider); "
                    "this onnxruntime offers " + ", ".join(ort.get_available_providers())
                )
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            providers = [("CUDAExecutionProvider", {"device_id": index})]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.device.type == "cpu":  # the same CPU budget as torch's, so engines compare fairly
            options.intra_op_num_threads = torch.get_num_threads()
        try:
            self.session = ort.InferenceSession(model, sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime's own: a cut file, ops it cannot run, CUDA libraries
            why = first_line(exc)
            if onnx_path is None:  # exported in this process: no file to blame
                raise BackendUnavailableError(
                    f"engine 'onnx': onnxruntime cannot run this model's graph ({why})"
                ) from None
            raise DataFormatError(
                onnx_path, f"onnxruntime cannot load it ({why}); if the file is damaged, export it again"
            ) from None
        self.names = input_names(denoiser)

    def describe(self) -> dict:
        return {**super().describe(), "exporter": self.exporter, "providers": self.session.get_providers()}

    @torch.no_grad()
    def denoise(self, x_t, t, cond, pose=None):
        values = [x_t.float(), t.long(), cond.float()] + ([pose.float()] if self.config.pose else [])
        if self.device.type != "cuda":
            feed = {n: v.cpu().contiguous().numpy() for n, v in zip(self.names, values, strict=True)}
            return torch.from_numpy(self.session.run(["out"], feed)[0])
        return self._run_cuda(values)

    def _run_cuda(self, values) -> torch.Tensor:
        binding = self.session.io_binding()
        index = self.device.index or 0
        values = [v.to(self.device).contiguous() for v in values]
        for name, v in zip(self.names, values, strict=True):
            dtype = np.int64 if v.dtype == torch.long else np.float32
            binding.bind_input(name, "cuda", index, dtype, list(v.shape), v.data_ptr())
        out = torch.empty_like(values[0])
        binding.bind_output("out", "cuda", index, np.float32, list(out.shape), out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # ORT runs on its own stream
        self.session.run_with_iobinding(binding)
        return out
