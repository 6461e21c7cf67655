"""The trt engine as far as it can be checked without TensorRT: the clear "not installed" error,
the sidecar that refuses a mismatching engine, the fp8 Q/DQ detection and the typing choice.
With TensorRT and a GPU the build + run test at the end runs too.
"""

import json
from types import SimpleNamespace

import pytest
import torch
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
    onnx = model_dir / "engines" / "denoiser.onnx"  # ... and the error says where the graph is
    assert f"The ONNX graph is written ({onnx}); build the engine from it" in captured.err
    assert f"--format trt --onnx {onnx}" in captured.err and captured.err.count("error:") == 1
    assert "onnxruntime vs torch max |diff|" in captured.out  # the TensorRT input was checked first
    assert onnx.is_file()
    assert not (model_dir / "engines" / "denoiser.plan").exists()


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
