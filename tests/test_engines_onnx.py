"""ONNX export round trip on CPU: opset, dynamic batch, inputs; onnxruntime against torch; vigface-export."""

import json

import pytest
import torch
from test_engines import SCHEDULE, TOLERANCE, inputs, model_dir, tiny_denoiser  # noqa: F401  (fixture)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from vigface.cli import export as export_cli  # noqa: E402
from vigface.engines import create_engine  # noqa: E402
from vigface.engines.export import export_onnx, onnxruntime_max_error  # noqa: E402
from vigface.errors import VigfaceError  # noqa: E402


@pytest.fixture(scope="module")
def exported():
    """The tiny denoiser exported once. The TorchScript exporter: seconds, where the dynamo one
    (the default when onnxscript is installed) takes ~20-40 s on 2 cores; that one is the slow test."""
    model = tiny_denoiser()
    data, exporter = export_onnx(model, exporter="legacy")
    return model, data, exporter


@pytest.mark.slow
def test_default_exporter_is_dynamo_and_round_trips():
    pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
    model = tiny_denoiser()
    data, exporter = export_onnx(model)
    assert exporter == "dynamo"  # tried first, and it works on this model
    check_graph(data)
    assert onnxruntime_max_error(data, model, batches=(1, 4)) <= TOLERANCE["fp32"]


def run_ort(data, model, n, seed):
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    values = [v for v in inputs(model, n, seed) if v is not None]
    names = [i.name for i in session.get_inputs()]
    return session.run(["out"], {k: v.numpy() for k, v in zip(names, values, strict=True)})[0], values


def check_graph(data):
    graph = onnx.load_from_string(data)
    onnx.checker.check_model(graph)
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in graph.graph.input] == ["x_t", "t", "cond", "pose"]
    elem = {i.name: i.type.tensor_type.elem_type for i in graph.graph.input}
    assert elem["t"] == onnx.TensorProto.INT64 and elem["cond"] == onnx.TensorProto.FLOAT
    for value in [*graph.graph.input, *graph.graph.output]:
        first = value.type.tensor_type.shape.dim[0]
        assert first.dim_param and not first.dim_value, f"{value.name}: batch axis is not dynamic"


def test_graph_has_opset_17_plus_named_inputs_and_a_dynamic_batch(exported):
    check_graph(exported[1])


@pytest.mark.parametrize("n", [1, 3, 7])
def test_onnxruntime_matches_torch_at_any_batch(exported, n):
    model, data, _ = exported
    got, values = run_ort(data, model, n, seed=n)
    with torch.no_grad():
        want = model(*values)
    assert got.shape == tuple(want.shape)
    assert torch.allclose(torch.from_numpy(got), want, atol=TOLERANCE["fp32"]), abs(got - want.numpy()).max()


@pytest.mark.parametrize("prediction,pose", [("v", False)])
def test_legacy_exporter_and_a_poseless_v_model(prediction, pose):
    model = tiny_denoiser(prediction, pose)
    data, exporter = export_onnx(model, exporter="legacy", opset=17)
    assert exporter == "legacy"
    assert [i.name for i in onnx.load_from_string(data).graph.input] == ["x_t", "t", "cond"]
    assert onnxruntime_max_error(data, model, batches=(2, 5)) <= TOLERANCE["fp32"]


def test_onnx_engine_denoise_and_sample_match_eager(exported):
    model, _, _ = exported
    engine = create_engine("onnx", model, SCHEDULE, "cpu", exporter="legacy")
    eager = create_engine("eager", model, SCHEDULE)
    x, t, cond, pose = inputs(model, 4)
    assert (engine.denoise(x, t, cond, pose) - eager.denoise(x, t, cond, pose)).abs().max() <= TOLERANCE[
        "fp32"
    ]
    w = torch.tensor([0.5, 2.5, 2.5, 1.0])
    x_T = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for sampler, steps in (("ddim", 6), ("dpm++", 5)):
        a = eager.sample(cond, pose, w, sampler=sampler, steps=steps, x_T=x_T)
        b = engine.sample(cond, pose, w, sampler=sampler, steps=steps, x_T=x_T)
        assert (a - b).abs().max() <= 1e-3


def test_bad_export_arguments():
    model = tiny_denoiser()
    with pytest.raises(VigfaceError, match="opset must be in 17..2"):
        export_onnx(model, opset=16)
    with pytest.raises(VigfaceError, match="opset must be in 17..2"):  # 99: a traceback from onnxruntime
        export_onnx(model, opset=99)
    with pytest.raises(VigfaceError, match="exporter 'jit'"):
        export_onnx(model, exporter="jit")


def test_vigface_export_writes_a_checked_onnx_and_gen_refuses_other_weights(model_dir, tmp_path, capsys):  # noqa: F811
    assert export_cli.main(["--model", str(model_dir), "--exporter", "legacy"]) == 0
    path = model_dir / "engines" / "denoiser.onnx"
    sidecar = json.loads((model_dir / "engines" / "denoiser.onnx.json").read_text())
    assert path.is_file() and sidecar["exporter"] == "legacy"
    assert 0 <= sidecar["onnxruntime_max_abs_diff"] <= TOLERANCE["fp32"]
    assert "onnxruntime vs torch max |diff|" in capsys.readouterr().out
    from vigface.diffusion.sampling import FaceSampler

    sampler = FaceSampler.load(model_dir, engine="onnx")  # uses the exported file
    assert sampler.engine.exporter == "legacy"
    with pytest.raises(VigfaceError, match="model_sha256: built for"):  # other weights: refused
        create_engine("onnx", tiny_denoiser(seed=9), SCHEDULE, "cpu", onnx_path=path)
    assert export_cli.main(["--model", str(model_dir), "--precision", "bf16"]) == 2
    assert "the onnx export is float32" in capsys.readouterr().err


@pytest.mark.slow  # one more dynamo export (~20-40 s on 2 cores)
def test_the_export_prints_nothing_about_torchvision():
    """The exporter logged "torchvision is not installed. Skipping torchvision::nms" (4 lines, even under
    vigface-gen --quiet); the denoiser has no torchvision op. torch's log handler writes to the stderr
    it found at import, so this runs in a fresh process."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from test_engines import tiny_denoiser; "
        "from vigface.engines.export import export_onnx; print(export_onnx(tiny_denoiser())[1])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "dynamo", done.stderr[-2000:]
    assert "torchvision" not in done.stderr


def test_vigface_export_records_what_it_wrote_and_refuses_options_it_ignored(model_dir, tmp_path, capsys):  # noqa: F811
    """--opset 17 wrote an opset-18 graph (the dynamo exporter's least) under a sidecar saying 17;
    TensorRT options went unchecked until after the export (a bad profile) or were ignored without a
    word (--format onnx); a kill -9's temporaries stayed for good."""
    from vigface.engines.export import graph_opset

    out = tmp_path / "d.onnx"
    stale = [tmp_path / ".d.onnx.99999999.tmp", tmp_path / ".d.onnx.json.99999998.tmp"]  # no such pids
    for path in stale:
        path.write_bytes(b"half a graph")
    assert export_cli.main(["--model", str(model_dir), "--opset", "17", "--out", str(out)]) == 0
    assert "ONNX (legacy exporter, opset 17)" in capsys.readouterr().out  # auto: dynamo cannot do 17
    sidecar = json.loads((tmp_path / "d.onnx.json").read_text())
    assert graph_opset(out.read_bytes()) == sidecar["opset"] == 17 and sidecar["dtype"] == "float32"
    assert not any(path.exists() for path in stale)
    model = ["--model", str(model_dir), "--out", str(tmp_path / "x.plan")]
    for args, message in (
        (["--opset", "17", "--exporter", "dynamo"], "the dynamo exporter writes opset 18 or above, not 17"),
        (["--min-batch", "8", "--device", "cuda:7"], "--min-batch, --device: TensorRT build options"),
        (["--format", "trt", "--min-batch", "8", "--opt-batch", "4"], "profile (8, 4, 64) must satisfy"),
        (["--format", "trt", "--workspace-gib", "-3"], "workspace must be a finite number of GiB"),
    ):
        assert export_cli.main([*model, *args]) == 2
        captured = capsys.readouterr()
        assert message in captured.err and "ONNX (" not in captured.out  # refused before exporting
    assert export_cli.main(["--model", str(model_dir), "--format", "trt", "--out", str(out)]) == 2
    assert "a TensorRT plan is not an ONNX graph; name it .plan" in capsys.readouterr().err
    assert not (tmp_path / "x.plan").exists() and not (tmp_path / "x.trt.onnx").exists()


def test_onnx_engine_refuses_a_damaged_or_reduced_precision_graph_in_one_line(model_dir, tmp_path, capsys):  # noqa: F811
    """A cut denoiser.onnx crashed vigface-gen with onnxruntime's InvalidProtobuf traceback; a bf16
    graph (a TensorRT input) with a sidecar naming the model with NotImplemented; --kernels fast was
    refused as another model, with advice (re-export) that could not help."""
    import shutil

    from vigface.cli import gen as gen_cli
    from vigface.diffusion.sampling import FaceSampler
    from vigface.errors import DataFormatError

    model = tmp_path / "m"
    shutil.copytree(model_dir, model, ignore=shutil.ignore_patterns("engines"))
    assert export_cli.main(["--model", str(model), "--exporter", "legacy"]) == 0
    graph = model / "engines" / "denoiser.onnx"
    whole = graph.read_bytes()
    graph.write_bytes(whole[: len(whole) // 3])
    gen = ["--model", str(model), "--engine", "onnx", "--ids", "virtual", "--num-ids", "1", "--per-id", "2",
           "--steps", "2", "--quiet"]  # fmt: skip
    capsys.readouterr()
    assert gen_cli.main([*gen, "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert "denoiser.onnx: onnxruntime cannot load it" in err and "Traceback" not in err
    graph.write_bytes(whole)
    sidecar = graph.with_name("denoiser.onnx.json")
    facts = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**facts, "dtype": "bfloat16"}))
    with pytest.raises(DataFormatError, match="a bfloat16 graph .* the onnx engine runs float32 graphs"):
        FaceSampler.load(model, engine="onnx")
    sidecar.write_text(json.dumps({**facts, "dtype": None}))  # an --onnx input of unknown dtype: taken
    assert FaceSampler.load(model, engine="onnx").engine.exporter == "legacy"
    sidecar.write_text(json.dumps(facts))
    with pytest.raises(VigfaceError, match="kernels 'fast' .--kernels fast. does not apply to engine 'onnx'"):
        FaceSampler.load(model, engine="onnx", kernels="fast")
    assert FaceSampler.load(model, engine="onnx").engine.exporter == "legacy"  # the intact graph loads
