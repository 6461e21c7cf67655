"""Sampling engines against eager: denoise per precision, whole sampling loops, auto, vigface-gen.

Engines that need a GPU (cudagraph; compile with Inductor at speed) are tested on CUDA only
(`cuda` marker); on CPU their clear "not available" errors are tested instead.
"""

import copy
import dataclasses
import gc
import json
import logging
import weakref

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vigface import engines
from vigface.cli import gen as gen_cli
from vigface.data.recordio import FaceRecordDataset
from vigface.diffusion.denoiser import Denoiser
from vigface.diffusion.denoiser_config import DenoiserConfig
from vigface.diffusion.sampling import FaceSampler
from vigface.diffusion.schedule import NoiseSchedule
from vigface.engines import create_engine
from vigface.engines.base import Engine
from vigface.engines.eager import EagerEngine
from vigface.engines.fp8 import Fp8Linear, Fp8Mlp, fp8_linear_ref
from vigface.engines.fused_update import cuda_op_available, plan_steps
from vigface.errors import BackendUnavailableError, VigfaceError

SCHEDULE = NoiseSchedule("cosine", 1000)
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
# |engine - eager fp32| on the denoiser output (|out| ~ 1), per precision of the engine
TOLERANCE = {"fp32": 1e-4, "bf16": 6e-2, "fp16": 1e-2, "fp8": 1.5e-1}


def tiny_denoiser(prediction="x0", pose=True, seed=0) -> Denoiser:
    torch.manual_seed(seed)
    config = DenoiserConfig.preset(
        "tiny", width=64, depth=3, image_size=32, cond_dim=32, prediction=prediction, pose=pose
    )
    model = Denoiser(config).eval()
    with torch.no_grad():  # the zero-initialised AdaLN/output layers would make every engine agree trivially
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.05)
    return model


def inputs(model, n, seed=1, device="cpu"):
    g, s = torch.Generator().manual_seed(seed), model.config.image_size
    x = torch.randn(n, 3, s, s, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    cond = torch.nn.functional.normalize(torch.randn(n, model.config.cond_dim, generator=g), dim=1)
    pose = torch.rand(n, 5, s, s, generator=g) if model.config.pose else None
    return [None if v is None else v.to(device) for v in (x, t, cond, pose)]


@pytest.fixture(scope="module")
def model():
    return tiny_denoiser()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_eager_denoise_is_the_module(model, precision):
    engine = create_engine("eager", model, SCHEDULE, "cpu", precision)
    x, t, cond, pose = inputs(model, 3)
    with torch.no_grad():
        want = model(x, t, cond, pose)
    got = engine.denoise(x, t, cond, pose)
    assert got.dtype == torch.float32
    assert (got - want).abs().max() <= TOLERANCE[precision]
    if precision == "fp32":
        assert torch.equal(got, want)
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is never cast


def test_compile_denoise_matches_eager(model):
    # backend "eager": Dynamo's full-graph capture (a graph break would be an error) without
    # Inductor's code generation, which takes over a minute per shape on 2 CPU cores (that path
    # is the slow test below). One batch size: dynamic=False compiles once per shape.
    engine = create_engine("compile", model, SCHEDULE, "cpu", "fp32", backend="eager")
    x, t, cond, pose = inputs(model, 3)
    err = (
        engine.denoise(x, t, cond, pose) - create_engine("eager", model, SCHEDULE).denoise(x, t, cond, pose)
    ).abs()
    assert err.max().item() <= TOLERANCE["fp32"]


def test_compile_with_triton_attention_matches_eager(model):
    # the Triton kernel enters the graph as the custom op vigface::flash_attention (interpreted on a
    # CPU); aot_eager runs its fake implementation as Inductor would, without the code generation
    engine = create_engine("compile", model, SCHEDULE, "cpu", "fp32", backend="aot_eager", attention="triton")
    assert engine.model.config.attention == "triton" and engine.model.config.adaln == "reference"
    x, t, cond, pose = inputs(model, 3)
    err = (
        engine.denoise(x, t, cond, pose) - create_engine("eager", model, SCHEDULE).denoise(x, t, cond, pose)
    ).abs()
    assert err.max().item() <= TOLERANCE["fp32"]
    with pytest.raises(VigfaceError, match="attention 'flash2' is unknown"):
        create_engine("compile", model, SCHEDULE, "cpu", "fp32", attention="flash2")


@pytest.mark.parametrize("scaling", ["static", "dynamic"])
def test_compile_fp8_denoise_is_within_the_fp8_tolerance(model, scaling):
    engine = create_engine("compile", model, SCHEDULE, "cpu", "fp8", backend="eager", fp8_scaling=scaling)
    layers = [m for m in engine.model.modules() if isinstance(m, Fp8Linear)]
    # the block linears (qkv, proj, 2 MLP; skip merges in the 2 out blocks) are e4m3 now
    assert len(layers) == 4 * model.config.depth + model.config.depth // 2
    x, t, cond, pose = inputs(model, 3)
    with torch.no_grad():
        want = model(x, t, cond, pose)
    first = engine.denoise(x, t, cond, pose)  # static: the calibration call (dynamic scales)
    assert all((m.input_scale is not None) == (scaling == "static") for m in layers)
    second = engine.denoise(x, t, cond, pose)  # static: the compiled graph with fixed scales
    for got in (first, second):
        err = (got - want).abs().max().item()
        assert 1e-4 < err <= TOLERANCE["fp8"], err  # changed by fp8 rounding, but only that much
    if scaling == "dynamic":
        assert torch.equal(first, second)


def test_fp8_calibration_fixes_each_scale_at_headroom_times_the_largest_input(model):
    engine = create_engine("compile", model, SCHEDULE, "cpu", "fp8", backend="eager", fp8_headroom=3.0)
    layers = [m for m in engine.model.modules() if isinstance(m, Fp8Linear)]
    seen = {id(m): torch.zeros(()) for m in layers}
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.__setitem__(id(m), torch.maximum(
        seen[id(m)], a[0].abs().amax()))) for m in layers]  # fmt: skip
    x, t, cond, pose = inputs(model, 2)
    engine.sample(cond, pose, 2.0, sampler="ddim", steps=3, x_T=x)  # the first call calibrates over 3 steps
    for h in hooks:
        h.remove()
    for m in layers:
        torch.testing.assert_close(m.input_scale, seen[id(m)] * 3.0 / 448, rtol=1e-6, atol=0)
    assert not engine.needs_calibration and engine.describe()["fp8_scaling"] == "static"
    with pytest.raises(VigfaceError, match="fp8_scaling 'delayed' is unknown"):
        create_engine("compile", model, SCHEDULE, "cpu", "fp8", fp8_scaling="delayed")
    with pytest.raises(VigfaceError, match="fp8_headroom must be >= 1"):
        create_engine("compile", model, SCHEDULE, "cpu", "fp8", fp8_headroom=0.5)


@pytest.mark.slow
def test_compile_with_inductor_matches_eager(model):
    engine = create_engine("compile", model, SCHEDULE, "cpu", "fp32")
    x, t, cond, pose = inputs(model, 2)
    err = (
        engine.denoise(x, t, cond, pose) - create_engine("eager", model, SCHEDULE).denoise(x, t, cond, pose)
    ).abs()
    assert err.max() <= TOLERANCE["fp32"]


@pytest.mark.parametrize("shape", [(7, 64), (3, 5, 128)])
def test_fp8_linear_matches_its_dequantised_reference(shape):
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(shape[-1], 48)
    x = torch.randn(*shape, generator=g)
    got = Fp8Linear(linear)(x)
    ref = fp8_linear_ref(x, linear.weight, linear.bias)
    exact = linear(x)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)  # same quantisation, float32 product
    rel = ((got - exact).norm() / exact.norm()).item()
    assert 1e-3 < rel < 0.1, rel  # e4m3 has 3 mantissa bits: a few % error, never zero


def test_an_fp8_mlp_keeps_its_separate_gelu_under_mlp_cublaslt(model, monkeypatch):
    # _scaled_mm has no GELU epilogue: with fp8 linears the cuBLASLt path must step aside
    from vigface.engines.base import denoiser_with
    from vigface.engines.fp8 import convert_block_linears_to_fp8

    monkeypatch.setattr("vigface.diffusion.denoiser.use_fused_gelu", lambda choice, h: choice == "cublaslt")
    fused, plain = denoiser_with(model, mlp="cublaslt"), copy.deepcopy(model)  # the fixture is not converted
    for m in (fused, plain):
        convert_block_linears_to_fp8(m)
    x, t, cond, pose = inputs(model, 2)
    with torch.no_grad():
        assert torch.equal(fused(x, t, cond, pose), plain(x, t, cond, pose))


def test_compile_mode_defaults_by_device_and_vigface_compile_mode_overrides_it(model, monkeypatch):
    from vigface.engines.compile import default_mode

    monkeypatch.delenv("VIGFACE_COMPILE_MODE", raising=False)
    assert default_mode("inductor", torch.device("cuda")) == "max-autotune"
    assert default_mode("inductor", torch.device("cpu")) is None
    assert default_mode("eager", torch.device("cuda")) is None
    monkeypatch.setenv("VIGFACE_COMPILE_MODE", "default")
    assert default_mode("inductor", torch.device("cuda")) == "default"
    engine = create_engine("compile", model, SCHEDULE, "cpu", "fp32", backend="eager")
    assert engine.describe()["mode"] == "default"
    monkeypatch.setenv("VIGFACE_COMPILE_MODE", "reduce-overhead")
    explicit = create_engine("compile", model, SCHEDULE, "cpu", "fp32", backend="eager", mode="default")
    assert explicit.mode == "default"  # an explicit mode wins
    monkeypatch.setenv("VIGFACE_COMPILE_MODE", "fastest")
    with pytest.raises(VigfaceError, match="VIGFACE_COMPILE_MODE='fastest': choose one of default"):
        create_engine("compile", model, SCHEDULE, "cpu", "fp32", backend="eager")


def test_static_fp8_linear_matches_its_reference_and_saturates():
    g = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(32, 16)
    layer = Fp8Linear(linear)
    layer.input_scale = torch.tensor(2.0 / 448)  # |x| up to 2 is representable
    x = torch.randn(5, 32, generator=g)
    torch.testing.assert_close(layer(x), fp8_linear_ref(x, linear.weight, linear.bias, layer.input_scale))
    big = x.clone()
    big[0, 0] = 50.0  # saturates at 2.0: the output is that of the clamped input
    clamped = big.clamp(-2, 2)
    torch.testing.assert_close(layer(big), layer(clamped), atol=0, rtol=0)


class SteppedEager(EagerEngine):
    """Eager's denoise in the base engine's loop (what compile / onnx / trt run around theirs)."""

    sample = Engine.sample


@pytest.mark.parametrize(
    "sampler,steps,prediction", [("ddim", 8, "x0"), ("dpm++", 5, "v"), ("dpm++logsnr", 6, "x0")]
)
def test_stepped_loop_matches_the_eager_reference_samplers(sampler, steps, prediction):
    """The loop every non-eager engine runs (denoise + fused update) against eager's reference loop."""
    model = tiny_denoiser(prediction)
    eager = create_engine("eager", model, SCHEDULE)
    stepped = SteppedEager(model, SCHEDULE)
    _, _, cond, pose = inputs(model, 3)
    w = torch.tensor([0.5, 2.5, 2.5])
    x_T = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    want = eager.sample(cond, pose, w, sampler=sampler, steps=steps, x_T=x_T)
    got = stepped.sample(cond, pose, w, sampler=sampler, steps=steps, x_T=x_T)
    assert want.abs().max() <= 1 and want.std() > 0.05
    assert (got - want).abs().max() <= 1e-4


@pytest.mark.parametrize("engine_class", [SteppedEager, EagerEngine])
def test_sample_leaves_the_callers_noise_as_it_was(model, engine_class):
    """The loops update x in place: on x_T itself they turned a caller's noise into the last call's
    images (bench/sample_throughput.py then started later samplers from them, so their drift from
    eager read 4.3 levels on the CPU where it is ~0). Same x_T twice: same images."""
    engine = engine_class(model, SCHEDULE)
    _, _, cond, pose = inputs(model, 2)
    x_T = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    kept = x_T.clone()
    first = engine.sample(cond, pose, 2.5, sampler="dpm++", steps=4, x_T=x_T)
    assert torch.equal(x_T, kept)
    torch.testing.assert_close(engine.sample(cond, pose, 2.5, sampler="dpm++", steps=4, x_T=x_T), first)


def test_sample_input_errors(model):
    engine = create_engine("eager", model, SCHEDULE)
    _, _, cond, pose = inputs(model, 2)
    with pytest.raises(VigfaceError, match="cond must have shape"):
        engine.sample(cond[:, :5], pose, 1.0, steps=2)
    with pytest.raises(VigfaceError, match="pose must have shape"):
        engine.sample(cond, None, 1.0, steps=2)
    with pytest.raises(VigfaceError, match="w must be"):
        engine.sample(cond, pose, torch.ones(3), steps=2)
    with pytest.raises(VigfaceError, match="sampler 'euler'"):
        engine.sample(cond, pose, 1.0, steps=2, sampler="euler")
    with pytest.raises(VigfaceError, match="engine 'jax' is unknown"):
        create_engine("jax", model, SCHEDULE)
    with pytest.raises(VigfaceError, match="precision 'fp8' is not offered"):
        create_engine("eager", model, SCHEDULE, "cpu", "fp8")


@pytest.mark.skipif(HAS_CUDA, reason="the CPU-only errors")
def test_gpu_engines_say_what_is_missing(model):
    with pytest.raises(BackendUnavailableError, match="'cudagraph' needs a CUDA device"):
        create_engine("cudagraph", model, SCHEDULE, "cpu")


def test_auto_picks_an_engine_that_starts_and_logs_it(model, caplog, monkeypatch):
    with caplog.at_level(logging.INFO, logger="vigface.engines"):
        engine = create_engine("auto", model, SCHEDULE, "cpu", exporter="legacy")  # options it ignores
    assert engine.name == "eager" and "engine auto -> eager" in caplog.text
    # an engine that cannot start is skipped, and said so; one whose precision is not offered too
    monkeypatch.setitem(engines.AUTO_ORDER, "cpu", ("cudagraph", "onnx", "eager"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vigface.engines"):
        engine = create_engine("auto", model, SCHEDULE, "cpu", "bf16", exporter="legacy")
    assert engine.name == "eager" and engine.precision == "bf16"
    assert "skipped cudagraph: engine 'cudagraph' needs a CUDA device" in caplog.text
    assert "skipped onnx:" in caplog.text


# -- GPU ---------------------------------------------------------------------------------------------


def _tensors_in(obj, depth=0):
    """Tensors reachable from a closure cell: directly, in lists/tuples, or in dataclass fields."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 3 and isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors_in(item, depth + 1)
    elif depth < 3 and dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for field in dataclasses.fields(obj):
            yield from _tensors_in(getattr(obj, field.name), depth + 1)


def test_cudagraph_loop_buffers_outlive_the_capture(model):
    """A CUDA graph holds addresses, not tensors: every tensor the captured loop touches must still
    be alive after capture, or the allocator reuses its memory and later replays read garbage (the
    first H100 run: model_in and the timesteps lived only in the capture closure; the first replay
    matched eager, the next ones did not). Checked on the CPU with the capture replaced by a call."""
    from vigface.engines.cudagraph import CudaGraphEngine

    engine = object.__new__(CudaGraphEngine)  # the CPU cannot build one: set what _capture_loop uses
    engine.model, engine.dtype, engine.device, engine.update_impl = (
        model.eval(),
        torch.float32,
        torch.device("cpu"),
        "torch",
    )
    seen = {}

    def call_instead_of_capture(fn):
        fn()
        seen["refs"] = [weakref.ref(t) for cell in fn.__closure__ for t in _tensors_in(cell.cell_contents)]
        return "graph"

    engine._capture = call_instead_of_capture
    _, _, cond, pose = inputs(model, 2)
    plan = plan_steps(SCHEDULE, "dpm++", 4, model.config.prediction)
    cond2, pose2 = torch.cat([cond, torch.zeros_like(cond)]), torch.cat([pose, torch.zeros_like(pose)])
    loop = engine._capture_loop(plan, cond2, pose2, torch.tensor([0.5, 2.5]), torch.randn(2, 3, 32, 32))
    gc.collect()
    assert loop.graph == "graph" and len(seen["refs"]) >= 7 + len(plan) - 1
    assert all(ref() is not None for ref in seen["refs"])


def test_cudagraph_denoise_results_survive_the_next_replay(model):
    """A replay writes into the captured output buffer: `denoise` must hand out a copy, or a kept
    result (fp32, where .float() returned the buffer itself) turns into the next call's. Checked on
    the CPU with the capture replaced by a call and the replay by a call copied into the buffer."""
    from vigface.engines.cudagraph import CudaGraphEngine

    engine = object.__new__(CudaGraphEngine)  # the CPU cannot build one: set what denoise uses
    engine.model, engine.dtype, engine.device, engine._forwards = model.eval(), torch.float32, "cpu", {}

    def capture_as_a_call(fn):
        fn()
        holder = next(c.cell_contents for c in fn.__closure__ if isinstance(c.cell_contents, dict))
        captured_out = holder["out"]

        class Replay:
            def replay(self):
                fn()
                captured_out.copy_(holder["out"])

        return Replay()

    engine._capture = capture_as_a_call
    first, second = inputs(model, 3, seed=1), inputs(model, 3, seed=2)
    kept = engine.denoise(*first)
    engine.denoise(*second)  # replays the graph captured for the first call's batch size
    with torch.no_grad():
        torch.testing.assert_close(kept, model(*first))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cudagraph_denoise_matches_eager(model, precision):
    engine = create_engine("cudagraph", model, SCHEDULE, "cuda", precision)
    eager = create_engine("eager", model, SCHEDULE, "cuda")
    results = []
    for n in (1, 6, 6):  # the third call replays the graph captured by the second
        x, t, cond, pose = inputs(model, n, seed=n, device="cuda")
        results.append((engine.denoise(x, t, cond, pose), eager.denoise(x, t, cond, pose)))
    for got, expected in results:  # compared after all calls: a replay must not change a kept result
        err = (got - expected).abs().max().item()
        assert err <= TOLERANCE[precision], err


def _images(engine, cond, pose, w, x_T, sampler, steps):
    x0 = engine.sample(cond, pose, w, sampler=sampler, steps=steps, x_T=x_T)
    return ((x0.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def _same_images(a, b, what):
    diff = (a.int() - b.int()).abs()
    print(f"{what}: max {diff.max().item()}, mean {diff.float().mean().item():.4f} levels, "
          f"{(diff == 0).float().mean().item():.4f} equal")  # fmt: skip
    assert diff.max() <= 1 and (diff == 0).float().mean() >= 0.99


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("impl", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("sampler,steps", [("ddim", 100), ("dpm++", 20)])
def test_cudagraph_images_equal_eager_images(model, sampler, steps, impl):
    if impl == "cuda" and not cuda_op_available():
        pytest.skip("vigface._C was built without CUDA")
    eager = create_engine("eager", model, SCHEDULE, "cuda")
    graph = create_engine("cudagraph", model, SCHEDULE, "cuda", update_impl=impl)
    _, _, cond, pose = inputs(model, 4, device="cuda")
    w = torch.tensor([0.5, 2.5, 2.5, 1.0], device="cuda")
    for seed in (0, 1):  # the second batch replays the captured loop with new inputs
        x_T = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).cuda()
        a = _images(eager, cond, pose, w, x_T, sampler, steps)
        b = _images(graph, cond, pose, w, x_T, sampler, steps)
        _same_images(a, b, f"cudagraph[{impl}] {sampler}-{steps} seed {seed} vs eager")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("impl", ["cuda", "triton"])
@pytest.mark.parametrize("sampler,steps", [("ddim", 100), ("dpm++", 20)])
def test_stepped_loop_on_cuda_equals_eager_images(model, sampler, steps, impl, monkeypatch):
    """The base loop (no graph) with the fused update on the GPU: the update op apart from capture."""
    if impl == "cuda" and not cuda_op_available():
        pytest.skip("vigface._C was built without CUDA")
    monkeypatch.setenv("VIGFACE_GUIDED_UPDATE", impl)
    eager = create_engine("eager", model, SCHEDULE, "cuda")
    stepped = SteppedEager(model, SCHEDULE, "cuda")
    _, _, cond, pose = inputs(model, 4, device="cuda")
    w = torch.tensor([0.5, 2.5, 2.5, 1.0], device="cuda")
    x_T = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)).cuda()
    a = _images(eager, cond, pose, w, x_T, sampler, steps)
    b = _images(stepped, cond, pose, w, x_T, sampler, steps)
    _same_images(a, b, f"stepped[{impl}] {sampler}-{steps} vs eager")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("attention", ["sdpa", "triton"])
def test_compile_inductor_on_cuda_matches_eager(model, attention):
    engine = create_engine("compile", model, SCHEDULE, "cuda", "bf16", mode="default", attention=attention)
    x, t, cond, pose = inputs(model, 4, device="cuda")
    eager = create_engine("eager", model, SCHEDULE, "cuda")
    assert (engine.denoise(x, t, cond, pose) - eager.denoise(x, t, cond, pose)).abs().max() <= TOLERANCE[
        "bf16"
    ]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("scaling", ["static", "dynamic"])
def test_compile_fp8_on_cuda_is_within_the_fp8_tolerance(model, scaling):
    if not torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("fp8 needs sm_89+")
    engine = create_engine("compile", model, SCHEDULE, "cuda", "fp8", mode="default", fp8_scaling=scaling,
                           attention="triton", mlp="cublaslt")  # fmt: skip
    mlps = [m for m in engine.model.modules() if isinstance(m, Fp8Mlp)]
    assert mlps and all(m.fused for m in mlps)  # static scales: the fused fp8 GELU GEMM after calibration
    x, t, cond, pose = inputs(model, 4, device="cuda")
    want = create_engine("eager", model, SCHEDULE, "cuda").denoise(x, t, cond, pose)
    for _ in range(2):  # static: the calibration call, then the compiled graph with fixed scales
        err = (engine.denoise(x, t, cond, pose) - want).abs().max().item()
        assert err <= TOLERANCE["fp8"], err


# -- vigface-gen through an engine -------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A denoiser folder as vigface-train-diffusion writes it (random weights), and its FR prototypes."""
    root = tmp_path_factory.mktemp("engines_model")
    fr, dm = root / "fr", root / "dm"
    fr.mkdir()
    dm.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"real": torch.randn(2, 32, generator=g), "virtual": torch.randn(2, 32, generator=g)},
              str(fr / "prototypes.safetensors"))  # fmt: skip
    model = tiny_denoiser()
    save_file(model.state_dict(), str(dm / "denoiser.safetensors"))
    meta = {"denoiser": model.config.to_dict(), "schedule": {"kind": "cosine", "num_steps": 1000},
            "fr_model": str(fr), "train_config": {}}  # fmt: skip
    (dm / "denoiser.json").write_text(json.dumps(meta))
    return dm


def test_vigface_gen_engine_onnx_writes_the_same_dataset_format(model_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    common = ["--model", str(model_dir), "--ids", "both", "--per-id", "2", "--steps", "4",
              "--pose", "frontal", "--batch-size", "4", "--shard-size", "4", "--quiet"]  # fmt: skip
    from vigface.cli import export as export_cli

    # export once (TorchScript exporter: seconds on 2 cores); gen then loads <model>/engines/denoiser.onnx
    assert export_cli.main(["--model", str(model_dir), "--exporter", "legacy"]) == 0
    outs = {}
    for engine in ("eager", "onnx"):
        outs[engine] = tmp_path / engine
        assert gen_cli.main([*common, "--out", str(outs[engine]), "--engine", engine]) == 0
    a, b = (FaceRecordDataset(outs[e] / "train.rec") for e in ("eager", "onnx"))
    assert len(a) == len(b) == 8 and np.array_equal(a.labels, b.labels)
    assert sorted(p.name for p in outs["eager"].iterdir()) == sorted(p.name for p in outs["onnx"].iterdir())
    for i in range(len(a)):
        ia, ib = a[i][0].astype(int), b[i][0].astype(int)
        assert ia.shape == ib.shape == (112, 112, 3)
        assert np.abs(ia - ib).mean() < 1.0  # JPEG of images equal up to float rounding
    plan = json.loads((outs["onnx"] / "generation.json").read_text())["plan"]["config"]
    assert plan["engine"] == "onnx"


def test_face_sampler_trt_without_tensorrt_is_a_clear_error(model_dir):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        FaceSampler.load(model_dir, engine="trt")
