"""The trt engine as far as it can be checked without TensorRT: the clear "not installed" error,
the sidecar that refuses a mismatching engine, the fp8 Q/DQ detection and the typing choice.
With TensorRT and a GPU the build + run test at the end runs too.
"""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_engines import SCHEDULE, TOLERANCE, inputs, model_dir, tiny_denoiser  # noqa: F401  (fixture)

from vigface.cli import export as export_cli
from vigface.engines import create_engine
from vigface.engines.sidecar import check_sidecar, read_sidecar, sidecar_path, write_sidecar
from vigface.engines.trt import has_fp8_qdq, resolve_typing
from vigface.errors import BackendUnavailableError, DataFormatError, VigfaceError

try:
    import tensorrt  # noqa: F401

    HAS_TRT = True
except ImportError:
    HAS_TRT = False


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_without_tensorrt_the_engine_says_so(tmp_path):
    with pytest.raises(
        BackendUnavailableError, match="engine 'trt' is not available: TensorRT is not installed"
    ):
        create_engine("trt", tiny_denoiser(), SCHEDULE, "cpu", plan=tmp_path / "denoiser.plan")


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_vigface_export_trt_writes_the_checked_onnx_then_reports_missing_tensorrt(model_dir, capsys):  # noqa: F811
    pytest.importorskip("onnxruntime")
    code = export_cli.main(
        ["--model", str(model_dir), "--format", "trt", "--precision", "bf16", "--exporter", "legacy"]
    )
    assert code == 2
    captured = capsys.readouterr()
    assert "TensorRT is not installed" in captured.err
    onnx = model_dir / "engines" / "denoiser.trt.onnx"  # ... and the error says where the graph is
    assert f"The ONNX graph is written ({onnx}); build the engine from it" in captured.err
    assert f"--format trt --onnx {onnx}" in captured.err and captured.err.count("error:") == 1
    assert "onnxruntime vs torch max |diff|" in captured.out  # the TensorRT input was checked first
    assert onnx.is_file()
    assert not (model_dir / "engines" / "denoiser.plan").exists()


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_a_bf16_trt_export_leaves_the_onnx_engines_graph_alone(model_dir, tmp_path, capsys):  # noqa: F811
    """The TensorRT path wrote its graph to <plan>.onnx, for the default plan the onnx engine's own
    denoiser.onnx: a strongly typed bf16 graph replaced it, and vigface-gen --engine onnx died in
    onnxruntime (NotImplemented: Add)."""
    pytest.importorskip("onnxruntime")
    model = tmp_path / "m"
    shutil.copytree(model_dir, model, ignore=shutil.ignore_patterns("engines"))
    assert export_cli.main(["--model", str(model), "--exporter", "legacy"]) == 0
    fp32 = (model / "engines" / "denoiser.onnx").read_bytes()
    args = ["--model", str(model), "--format", "trt", "--precision", "bf16", "--typing", "strong"]
    assert export_cli.main([*args, "--exporter", "legacy"]) == 2  # TensorRT is missing here
    assert "TensorRT is not installed" in capsys.readouterr().err
    assert (model / "engines" / "denoiser.onnx").read_bytes() == fp32
    trt_graph = json.loads((model / "engines" / "denoiser.trt.onnx.json").read_text())
    assert trt_graph["dtype"] == "bfloat16"
    from vigface.diffusion.sampling import FaceSampler

    assert FaceSampler.load(model, engine="onnx").engine.exporter == "legacy"  # still its fp32 graph


def test_vigface_export_to_a_folder_is_refused_before_exporting(model_dir, tmp_path, capsys):  # noqa: F811
    for fmt in ("onnx", "trt"):
        assert export_cli.main(["--model", str(model_dir), "--format", fmt, "--out", str(tmp_path)]) == 2
        captured = capsys.readouterr()
        assert f"--out {tmp_path}: is a folder; give the file to write" in captured.err
        assert "ONNX (" not in captured.out  # nothing was exported
    assert not list(tmp_path.iterdir())


def test_sidecar_refuses_every_mismatch_by_name(tmp_path):
    plan = tmp_path / "denoiser.plan"
    plan.write_bytes(b"\x00engine")
    built = {"tensorrt": "10.3.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
             "precision": "bf16", "model_sha256": "a" * 64}  # fmt: skip
    write_sidecar(plan, built)
    facts = read_sidecar(plan)
    check_sidecar(plan, facts, built)  # the same setup passes
    here = {**built, "tensorrt": "10.8.0", "gpu": "NVIDIA A100-SXM4-80GB", "model_sha256": "b" * 64}
    with pytest.raises(VigfaceError) as err:
        check_sidecar(plan, facts, here)
    message = str(err.value)
    assert "refused" in message and "vigface-export" in message
    for key in ("tensorrt: built for '10.3.0', here '10.8.0'", "gpu: built for", "model_sha256: built for"):
        assert key in message
    assert "precision" not in message  # only what differs is named


def test_missing_or_corrupt_sidecar_is_a_clear_error(tmp_path):
    plan = tmp_path / "denoiser.plan"
    with pytest.raises(DataFormatError, match="not found; build it with vigface-export"):
        read_sidecar(plan)
    plan.write_bytes(b"x")
    with pytest.raises(DataFormatError, match="sidecar of this export is missing"):
        read_sidecar(plan)
    sidecar_path(plan).write_text("{not json")
    with pytest.raises(DataFormatError, match="not valid JSON"):
        read_sidecar(plan)
    sidecar_path(plan).write_text(json.dumps({"format": 99}))
    with pytest.raises(DataFormatError, match="format 1"):
        read_sidecar(plan)


def test_fp8_qdq_detection():
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    def graph(zero_point_type):
        zp = helper.make_tensor("zp", zero_point_type, [], [0])
        scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])]  # fmt: skip
        g = helper.make_graph(
            nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [scale, zp],
        )  # fmt: skip
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]).SerializeToString()

    assert has_fp8_qdq(graph(TensorProto.FLOAT8E4M3FN))
    assert not has_fp8_qdq(graph(TensorProto.INT8))  # int8 Q/DQ is not fp8
    from vigface.engines.export import export_onnx

    assert not has_fp8_qdq(export_onnx(tiny_denoiser(), exporter="legacy")[0])
    assert onnx is not None


def test_typing_follows_what_the_installed_tensorrt_offers():
    with_flags = SimpleNamespace(BuilderFlag=SimpleNamespace(BF16=1, FP16=2))
    without = SimpleNamespace(BuilderFlag=SimpleNamespace())  # a version that dropped weak typing
    assert resolve_typing(with_flags, "bf16", "auto") == "weak"
    assert resolve_typing(without, "bf16", "auto") == "strong"
    assert resolve_typing(without, "fp32", "auto") == "weak"
    assert resolve_typing(with_flags, "fp8", "auto") == "strong"
    with pytest.raises(VigfaceError, match="fp8 TensorRT engines are strongly typed"):
        resolve_typing(with_flags, "fp8", "weak")


def fake_tensorrt(inputs=("x_t", "t", "cond", "pose"), outputs=("out",), accepted_cache=b"this gpu"):
    """Stands in for the TensorRT 10 Python API calls build_trt_engine makes (no TensorRT can be
    installed here): the network holds the given I/O names, and set_timing_cache accepts an empty
    cache or `accepted_cache`, rejecting others as TensorRT does a cache from another GPU/version."""
    calls = {"profiles": [], "caches_set": []}

    class Network:
        num_inputs, num_outputs = len(inputs), len(outputs)

        def get_input(self, i):
            return SimpleNamespace(name=inputs[i])

        def get_output(self, i):
            return SimpleNamespace(name=outputs[i])

    class Cache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return self.data

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls["workspace"] = size

        def set_flag(self, flag):
            calls["flag"] = flag

        def clear_flag(self, flag):
            pass

        def create_timing_cache(self, data):
            return Cache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            calls["caches_set"].append(cache.data)
            return cache.data in (b"", accepted_cache)

        def get_timing_cache(self):
            return Cache(accepted_cache)

        def add_optimization_profile(self, profile):
            calls["profiles"].append(profile.shapes)

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (lo, opt, hi)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"plan bytes"

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse(self, data):
            return True

    trt = SimpleNamespace(
        __version__="10.9.0", Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}),
        Builder=Builder, OnnxParser=Parser, NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=0),
        MemoryPoolType=SimpleNamespace(WORKSPACE=0), BuilderFlag=SimpleNamespace(BF16=1, FP16=2, TF32=3),
    )  # fmt: skip
    return trt, calls


def build_with(monkeypatch, tmp_path, trt, **kw):
    import vigface.engines.trt as trt_module

    monkeypatch.setattr(trt_module, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(
        trt_module, "gpu_identity", lambda device: {"gpu": "test", "compute_capability": "9.0"}
    )
    config = tiny_denoiser().config
    args = dict(config=config, precision="bf16", model_sha256="a" * 64, exporter="legacy")
    return trt_module.build_trt_engine(b"onnx", tmp_path / "denoiser.plan", **{**args, **kw})


def test_trt_build_writes_plan_sidecar_and_timing_cache_in_a_safe_order(monkeypatch, tmp_path):
    """With TensorRT's API faked: profiles in rows (2x images) for each input, the plan beside a
    sidecar describing it, an old sidecar removed before the new plan lands, a timing cache from
    another GPU rejected (so the build starts an empty one) and rewritten with this build's."""
    trt, calls = fake_tensorrt()
    (tmp_path / "denoiser.plan.json").write_text('{"format": 1, "precision": "fp32"}')  # an older build's
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"another gpu")
    plan = build_with(monkeypatch, tmp_path, trt, profiles=((1, 8, 16),), timing_cache=cache)
    assert plan.read_bytes() == b"plan bytes" and read_sidecar(plan)["precision"] == "bf16"
    assert calls["caches_set"] == [b"another gpu", b""] and cache.read_bytes() == b"this gpu"
    s = tiny_denoiser().config.image_size
    assert calls["profiles"] == [{"x_t": ((2, 3, s, s), (16, 3, s, s), (32, 3, s, s)),
                                  "t": ((2,), (16,), (32,)), "cond": ((2, 32), (16, 32), (32, 32)),
                                  "pose": ((2, 5, s, s), (16, 5, s, s), (32, 5, s, s))}]  # fmt: skip
    assert calls["flag"] == trt.BuilderFlag.BF16


def test_trt_build_refuses_a_foreign_graph_and_a_dropped_weak_flag(monkeypatch, tmp_path):
    trt, _ = fake_tensorrt(inputs=("input_ids", "t"))
    with pytest.raises(
        VigfaceError, match=r"has inputs \['input_ids', 't'\].*vigface-export writes such a graph"
    ):
        build_with(monkeypatch, tmp_path, trt)
    assert not (tmp_path / "denoiser.plan").exists()
    trt, _ = fake_tensorrt()
    trt.BuilderFlag = SimpleNamespace()  # TensorRT 11 dropped BuilderFlag.BF16 / FP16
    with pytest.raises(VigfaceError, match="has no BuilderFlag.BF16 .* typing 'strong' or 'auto'"):
        build_with(monkeypatch, tmp_path, trt, typing="weak")


@pytest.mark.cuda
@pytest.mark.skipif(not (HAS_TRT and torch.cuda.is_available()), reason="needs TensorRT and a GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_trt_engine_builds_runs_and_matches_eager(model_dir, precision):  # noqa: F811
    assert export_cli.main(["--model", str(model_dir), "--format", "trt", "--precision", precision,
                            "--opt-batch", "4", "--max-batch", "8", "--exporter", "legacy"]) == 0  # fmt: skip
    from vigface.diffusion.sampling import FaceSampler

    sampler = FaceSampler.load(model_dir, device="cuda", engine="trt")
    model = sampler.denoiser
    eager = create_engine("eager", model, SCHEDULE, "cuda")
    x, t, cond, pose = inputs(model, 6, device="cuda")
    err = (sampler.engine.denoise(x, t, cond, pose) - eager.denoise(x, t, cond, pose)).abs().max().item()
    assert err <= TOLERANCE[precision]


def test_vigface_export_trt_takes_an_onnx_graph_only_of_this_model(model_dir, tmp_path, capsys):  # noqa: F811
    """--onnx took any file and wrote it as the model's own graph under a sidecar naming the model,
    so vigface-gen --engine onnx ran another model's weights (or crashed on garbage). A graph with a
    sidecar must name this model; one without must agree with the model in onnxruntime."""
    pytest.importorskip("onnxruntime")
    other = tmp_path / "other"
    shutil.copytree(model_dir, other, ignore=shutil.ignore_patterns("engines"))
    weights = {k: v * 0.5 for k, v in load_file(other / "denoiser.safetensors").items()}
    save_file(weights, str(other / "denoiser.safetensors"))
    graph = tmp_path / "other.onnx"
    assert export_cli.main(["--model", str(other), "--out", str(graph), "--exporter", "legacy"]) == 0
    installed = model_dir / "engines" / "denoiser.trt.onnx"
    installed.unlink(missing_ok=True)
    trt = ["--model", str(model_dir), "--format", "trt", "--onnx"]
    capsys.readouterr()
    assert export_cli.main([*trt, str(graph)]) == 2
    assert "exported from another model (its sidecar's model_sha256" in capsys.readouterr().err
    bare = tmp_path / "bare.onnx"  # the same graph without its sidecar: checked in onnxruntime
    shutil.copyfile(graph, bare)
    assert export_cli.main([*trt, str(bare)]) == 2
    assert "does not compute this model: in onnxruntime its output differs" in capsys.readouterr().err
    garbage = tmp_path / "garbage.onnx"
    garbage.write_text("garbage")
    assert export_cli.main([*trt, str(garbage)]) == 2
    err = capsys.readouterr().err
    assert "garbage.onnx: --onnx: not an ONNX model" in err
    assert "Traceback" not in err and not installed.exists()  # nothing written for a refused graph
    assert export_cli.main([*trt, str(garbage), "--trust-onnx"]) == 2  # trust does not take garbage
    assert "not an ONNX model" in capsys.readouterr().err
    lonely = tmp_path / "lonely.onnx"  # a graph onnxruntime cannot run as the denoiser (no inputs of it)
    lonely.write_bytes(_identity_graph())
    assert export_cli.main([*trt, str(lonely)]) == 2
    err = capsys.readouterr().err
    assert "lonely.onnx: --onnx: onnxruntime cannot run it as this denoiser" in err and "--trust-onnx" in err
    assert not installed.exists()
    assert export_cli.main([*trt, str(tmp_path / "missing.onnx")]) == 2
    assert "missing.onnx: --onnx: no such file" in capsys.readouterr().err
    code = export_cli.main([*trt, str(bare), "--trust-onnx"])  # taken unchecked, and said so
    assert "taken on --trust-onnx, not checked against the model" in capsys.readouterr().err
    assert installed.read_bytes() == bare.read_bytes()
    installed.unlink()
    own = tmp_path / "own.onnx"  # this model's graph, without a sidecar: taken
    assert export_cli.main(["--model", str(model_dir), "--out", str(own), "--exporter", "legacy"]) == 0
    (tmp_path / "own.onnx.json").unlink()
    code = export_cli.main([*trt, str(own)])
    assert installed.read_bytes() == own.read_bytes()
    if not HAS_TRT:
        assert code == 2 and "TensorRT is not installed" in capsys.readouterr().err


def _identity_graph() -> bytes:
    """A valid ONNX model that is not a denoiser: y = Identity(x)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()
