"""The trt engine: the exported denoiser built into a TensorRT 10 engine, with a JSON sidecar.

Build (`vigface-export --format trt`, or `build_trt_engine`), against the TensorRT 10 Python API:

    network = trt.Builder(logger).create_network(flags); trt.OnnxParser(network, logger).parse(onnx)
    config.set_memory_pool_limit(WORKSPACE, bytes)            a bound on tactic scratch memory
    config.set_timing_cache(cache)                            tactic timings reused across builds (file)
    builder.create_optimization_profile() per batch range     the ONNX batch axis is dynamic
    precision: "weak" typing sets BuilderFlag.BF16 / FP16 on a float32 graph (TensorRT 10 offers
               these flags); "strong" typing (NetworkDefinitionCreationFlag.STRONGLY_TYPED) takes
               every dtype from the ONNX graph: a bf16 / fp16 export, or an fp8 graph whose Q/DQ nodes
               come from a quantiser (NVIDIA ModelOpt); vigface makes no fp8 Q/DQ itself, so fp8
               needs --onnx with such a graph. "auto" = weak when the flag exists, else strong
               (later TensorRT versions drop the weak-typing flags).
    builder.build_serialized_network(network, config)        -> the plan, written with the sidecar:
    denoiser.plan.json  {tensorrt, gpu, compute_capability, precision, model_sha256, onnx_sha256,
                         profiles, typing, exporter}

Load (`TrtEngine`): a TensorRT engine only runs on the TensorRT version and GPU model that built
it, and is only right for the weights it was built from, so the sidecar is compared with the
installed TensorRT, this GPU, the requested precision and the loaded weights' sha256 first; any
mismatch is refused naming what differs. Inference: set_input_shape / set_tensor_address on torch
tensors and execute_async_v3 on a stream of the engine's own, ordered after torch's current stream
and before it again (no copies, no host sync).

Profiles are given in images per sampling batch; the network sees twice as many rows ([cond; uncond]).
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path

import torch

from vigface.choices import PRECISIONS, TYPINGS
from vigface.diffusion.denoiser import Denoiser
from vigface.diffusion.schedule import NoiseSchedule
from vigface.engines.base import Engine, check_precision
from vigface.engines.export import state_sha256
from vigface.engines.sidecar import check_sidecar, read_sidecar, sidecar_path, write_sidecar
from vigface.errors import BackendUnavailableError, VigfaceError

log = logging.getLogger("vigface.engines")
_WEAK_FLAGS = {"bf16": "BF16", "fp16": "FP16"}
_ONNX_FLOAT8E4M3FN = 17  # onnx.TensorProto.FLOAT8E4M3FN
# The exported graph's inputs (vigface.engines.export) and their shape past the batch axis
_ROW_SHAPES = {
    "x_t": lambda c: (3, c.image_size, c.image_size),
    "t": lambda c: (),
    "cond": lambda c: (c.cond_dim,),
    "pose": lambda c: (5, c.image_size, c.image_size),
}


def import_tensorrt():
    """The tensorrt module (>= 10), or a clear BackendUnavailableError."""
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailableError(
            "engine 'trt' is not available: TensorRT is not installed. Install NVIDIA's TensorRT >= 10 "
            "Python package with its libraries (pip install 'vigface[trt]' from NVIDIA's package index), "
            "or use --engine cudagraph / compile / onnx"
        ) from None
    major = int(str(tensorrt.__version__).split(".")[0])
    if major < 10:
        raise BackendUnavailableError(
            "engine 'trt' needs TensorRT >= 10 (execute_async_v3, named I/O tensors); "
            f"found {tensorrt.__version__}"
        )
    return tensorrt


def gpu_identity(device: torch.device) -> dict:
    props = torch.cuda.get_device_properties(device)
    return {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}"}


def has_fp8_qdq(onnx_bytes: bytes) -> bool:
    """Whether the ONNX graph quantises to float8 e4m3 anywhere (Q/DQ nodes from a quantiser)."""
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    fp8_inits = {i.name for i in model.graph.initializer if i.data_type == _ONNX_FLOAT8E4M3FN}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if any(a.name == "output_dtype" and a.i == _ONNX_FLOAT8E4M3FN for a in node.attribute):
            return True
        if any(name in fp8_inits for name in node.input):
            return True
    return False


def has_weights_of(onnx_bytes: bytes, precision: str) -> bool:
    import onnx

    wanted = {"bf16": onnx.TensorProto.BFLOAT16, "fp16": onnx.TensorProto.FLOAT16}[precision]
    return any(i.data_type == wanted for i in onnx.load_from_string(onnx_bytes).graph.initializer)


def resolve_typing(trt, precision: str, typing: str) -> str:
    if typing not in TYPINGS:
        raise VigfaceError(f"typing {typing!r} is unknown; choose one of {', '.join(TYPINGS)}")
    if precision == "fp8":
        if typing == "weak":
            raise VigfaceError(
                "fp8 TensorRT engines are strongly typed (Q/DQ nodes); use typing 'strong' or 'auto'"
            )
        return "strong"
    if typing == "weak" and precision in _WEAK_FLAGS and not hasattr(trt.BuilderFlag, _WEAK_FLAGS[precision]):
        flag = _WEAK_FLAGS[precision]
        raise VigfaceError(
            f"TensorRT {getattr(trt, '__version__', '')} has no BuilderFlag.{flag} (weak typing was "
            f"dropped after TensorRT 10): build {precision} with typing 'strong' or 'auto'"
        )
    if typing != "auto":
        return typing
    if precision == "fp32" or hasattr(trt.BuilderFlag, _WEAK_FLAGS[precision]):
        return "weak"
    return "strong"


def check_build_options(profiles, workspace_gib: float) -> None:
    """Refuse impossible profiles or memory pools before any work (vigface-export checks them
    before its export, not after, where TensorRT's absence used to be all it reported)."""
    for lo, opt, hi in profiles:
        if not 1 <= lo <= opt <= hi:
            raise VigfaceError(f"optimisation profile {(lo, opt, hi)} must satisfy 1 <= min <= opt <= max")
    if not (math.isfinite(workspace_gib) and workspace_gib > 0):
        raise VigfaceError(f"the builder's workspace must be a finite number of GiB > 0, got {workspace_gib}")


def build_trt_engine(
    onnx_bytes: bytes,
    plan: str | Path,
    *,
    config,
    precision: str,
    model_sha256: str,
    exporter: str,
    typing: str = "auto",
    profiles: tuple[tuple[int, int, int], ...] = ((1, 64, 64),),
    workspace_gib: float = 8.0,
    timing_cache: str | Path | None = None,
    device: torch.device | str = "cuda",
) -> Path:
    """Build `onnx_bytes` (already typed for `typing`) into `plan` + sidecar; returns the plan path.

    config: the DenoiserConfig (input shapes); profiles: (min, opt, max) images per batch.
    """
    check_build_options(profiles, workspace_gib)
    trt = import_tensorrt()
    check_precision("trt", precision, PRECISIONS)
    typing = resolve_typing(trt, precision, typing)
    if precision == "fp8" and not has_fp8_qdq(onnx_bytes):
        raise VigfaceError(
            "fp8 TensorRT engines need an ONNX graph with float8 Q/DQ nodes (e.g. from NVIDIA ModelOpt's "
            "quantiser); vigface exports none itself. Pass such a graph with --onnx, or use bf16"
        )
    if typing == "strong" and precision in ("bf16", "fp16") and not has_weights_of(onnx_bytes, precision):
        raise VigfaceError(
            f"a strongly typed engine takes its precision from the ONNX graph, and this graph has no "
            f"{precision} weights; export it in {precision} (vigface-export --typing strong)"
        )
    device = torch.device(device)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if typing == "strong" else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise VigfaceError(f"TensorRT could not parse the ONNX graph: {errors}")
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    if not set(names) <= set(_ROW_SHAPES) or "x_t" not in names or outputs != ["out"]:
        raise VigfaceError(
            f"the ONNX graph has inputs {names} and outputs {outputs}; a vigface denoiser graph has inputs "
            f"{list(_ROW_SHAPES)} (pose optional) and one output 'out' (vigface-export writes such a graph)"
        )
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if typing == "weak":
        if precision in _WEAK_FLAGS:
            builder_config.set_flag(getattr(trt.BuilderFlag, _WEAK_FLAGS[precision]))
        elif hasattr(trt.BuilderFlag, "TF32"):
            builder_config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32, not TF32 tensor cores
    cache_bytes = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).is_file() else b""
    cache = builder_config.create_timing_cache(cache_bytes)
    if not builder_config.set_timing_cache(cache, ignore_mismatch=False):
        # a cache from another GPU or TensorRT version: rejected, so start an empty one (rewritten below)
        log.warning("timing cache %s does not match this GPU / TensorRT; building without it", timing_cache)
        builder_config.set_timing_cache(builder_config.create_timing_cache(b""), ignore_mismatch=False)
    per_row = {name: shape(config) for name, shape in _ROW_SHAPES.items()}
    for lo, opt, hi in profiles:
        profile = builder.create_optimization_profile()
        for name in names:
            rest = per_row[name]
            profile.set_shape(name, (2 * lo, *rest), (2 * opt, *rest), (2 * hi, *rest))
        builder_config.add_optimization_profile(profile)
    log.info("building a %s TensorRT engine (%s typing), profiles %s", precision, typing, profiles)
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise VigfaceError("TensorRT failed to build the engine (see its log above)")
    plan = Path(plan)
    plan.parent.mkdir(parents=True, exist_ok=True)
    # The old sidecar goes first: a build that stops between the plan and its sidecar leaves a plan
    # without one (refused on load), never a new plan beside an old sidecar that would vouch for it.
    sidecar_path(plan).unlink(missing_ok=True)
    tmp = plan.with_name(plan.name + ".tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(plan)
    write_sidecar(
        plan,
        {
            "tensorrt": trt.__version__,
            **gpu_identity(device),
            "precision": precision,
            "typing": typing,
            "model_sha256": model_sha256,
            "onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest(),
            "exporter": exporter,
            "profiles": [list(p) for p in profiles],
            "workspace_gib": workspace_gib,
        },
    )
    if timing_cache:
        tmp = Path(timing_cache).with_name(Path(timing_cache).name + ".tmp")
        tmp.write_bytes(bytes(builder_config.get_timing_cache().serialize()))
        tmp.replace(timing_cache)
    return plan


class TrtEngine(Engine):
    name = "trt"
    precisions = PRECISIONS

    def __init__(
        self,
        denoiser: Denoiser,
        schedule: NoiseSchedule,
        device="cuda",
        precision: str | None = None,
        plan: str | Path | None = None,
    ):
        trt = import_tensorrt()  # first: without TensorRT nothing else here can be checked
        if plan is None:
            raise VigfaceError(
                "engine 'trt' needs the path of an engine built by vigface-export --format trt"
            )
        facts = read_sidecar(plan)
        precision = precision or facts.get("precision")
        check_precision(self.name, precision, self.precisions)
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise BackendUnavailableError("engine 'trt' needs a CUDA device")
        expected = {
            "tensorrt": trt.__version__,
            **gpu_identity(device),
            "precision": precision,
            "model_sha256": state_sha256(denoiser),
        }
        check_sidecar(plan, facts, expected)
        super().__init__(denoiser.config, schedule, device, precision)
        self.plan, self.facts = Path(plan), facts
        self.profiles = [tuple(p) for p in facts["profiles"]]
        self._trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        with torch.cuda.device(self.device):  # TensorRT puts the engine on the current device
            self.engine = self.runtime.deserialize_cuda_engine(self.plan.read_bytes())
            if self.engine is None:
                raise VigfaceError(f"TensorRT could not deserialize {plan}")
            self.context = self.engine.create_execution_context()
            # enqueueV3 on the legacy default stream adds stream syncs (TensorRT warns): a stream of
            # its own, ordered after and before torch's current stream in denoise
            self._stream = torch.cuda.Stream(self.device)
        self._profile = 0
        self.inputs = [
            self.engine.get_tensor_name(i)
            for i in range(self.engine.num_io_tensors)
            if self.engine.get_tensor_mode(self.engine.get_tensor_name(i)) == trt.TensorIOMode.INPUT
        ]

    def describe(self) -> dict:
        return {**super().describe(), "plan": str(self.plan), "typing": self.facts.get("typing")}

    def _torch_dtype(self, name: str) -> torch.dtype:
        dt = self.engine.get_tensor_dtype(name)
        trt = self._trt
        table = {
            trt.DataType.FLOAT: torch.float32,
            trt.DataType.INT32: torch.int32,
            trt.DataType.HALF: torch.float16,
        }
        if hasattr(trt.DataType, "INT64"):
            table[trt.DataType.INT64] = torch.int64
        if hasattr(trt.DataType, "BF16"):
            table[trt.DataType.BF16] = torch.bfloat16
        return table[dt]

    @torch.no_grad()
    def denoise(self, x_t, t, cond, pose=None):
        rows = x_t.shape[0]
        profile = next((i for i, (lo, _, hi) in enumerate(self.profiles) if 2 * lo <= rows <= 2 * hi), None)
        if profile is None:
            raise VigfaceError(
                f"engine 'trt': {rows} rows fit none of the engine's profiles {self.profiles} "
                "(images per batch, x2 rows); rebuild with a wider --max-batch"
            )
        current, stream = torch.cuda.current_stream(self.device), self._stream
        if profile != self._profile:
            self.context.set_optimization_profile_async(profile, stream.cuda_stream)
            self._profile = profile
        values = {"x_t": x_t, "t": t, "cond": cond, "pose": pose}
        keep = []  # the tensors must live until the enqueued work has read them
        for name in self.inputs:
            v = values[name].to(self.device, self._torch_dtype(name)).contiguous()
            keep.append(v)
            self.context.set_input_shape(name, tuple(v.shape))
            self.context.set_tensor_address(name, v.data_ptr())
        out = torch.empty((rows, 3, self.config.image_size, self.config.image_size), device=self.device,
                          dtype=self._torch_dtype("out"))  # fmt: skip
        self.context.set_tensor_address("out", out.data_ptr())
        stream.wait_stream(current)  # after the inputs above were converted on torch's stream
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise VigfaceError("TensorRT execute_async_v3 failed (see its log)")
        # torch's stream waits for the engine: `out` is read, and `keep` / `out` freed (their blocks
        # reused by later work on torch's stream), only after the engine is done with them
        current.wait_stream(stream)
        return out.float()
