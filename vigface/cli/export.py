"""`vigface-export`: a trained denoiser -> ONNX (checked in onnxruntime) -> TensorRT engine.

    vigface-export --model runs/dm                          # runs/dm/engines/denoiser.onnx (+ .json sidecar)
    vigface-export --model runs/dm --format trt --precision bf16 --opt-batch 64 --max-batch 64
                                                            # runs/dm/engines/denoiser.plan (+ .json sidecar),
                                                            # built from runs/dm/engines/denoiser.trt.onnx

The ONNX graph (opset >= 17, dynamic batch, timestep and condition as inputs) is always compared
with the PyTorch model in onnxruntime before anything is written. `vigface-gen --engine onnx|trt`
then finds these files in <model>/engines/. A TensorRT engine is tied to the TensorRT version, the
GPU and the weights that built it (all in its sidecar): build it on the machine that generates.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from vigface.cli.common import check_output_file, positive_int, refuse_writing_over_inputs, run_command
from vigface.data.files import write_atomically
from vigface.data.output_folder import remove_stale_temporaries
from vigface.errors import BackendUnavailableError, DataFormatError, VigfaceError, VigfaceWarning, first_line

PROG = "vigface-export"
# |onnxruntime - torch| allowed for a float32 graph; measured ~1e-6 on the tiny model.
ONNX_TOLERANCE = 1e-3
# RMS |onnxruntime - torch| / RMS torch allowed for an --onnx graph without a vigface sidecar (e.g.
# one quantised elsewhere). Measured on the shipped tiny model's graph: against its weights rounded
# to bf16 0.12 %; against the same weights halved, i.e. another model, 165 %.
FOREIGN_ONNX_TOLERANCE = 0.15
# Options of --format trt alone, with their defaults.
TRT_DEFAULTS = {
    "typing": "auto", "min_batch": 1, "opt_batch": 64, "max_batch": 64, "workspace_gib": 8.0,
    "timing_cache": None, "device": "cuda",
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    from vigface.choices import DEFAULT_OPSET, EXPORTERS, PRECISIONS, TYPINGS

    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a vigface-train-diffusion output folder")
    p.add_argument("--format", choices=["onnx", "trt"], default="onnx")
    p.add_argument("--out", help="output file (default: <model>/engines/denoiser.onnx or .plan)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="trt only (onnx is fp32)")
    p.add_argument("--opset", type=positive_int, default=DEFAULT_OPSET)
    p.add_argument("--exporter", choices=EXPORTERS, default="auto", help="auto: dynamo, else TorchScript")
    p.add_argument("--onnx", help="trt: build from this ONNX graph (e.g. one with fp8 Q/DQ nodes)")
    p.add_argument(
        "--trust-onnx",
        action="store_true",
        help="trt: take an --onnx graph without a vigface sidecar unchecked (for one onnxruntime's CPU "
        "cannot run: bf16, TensorRT plugins); by default it must agree with the model in onnxruntime",
    )
    p.add_argument("--typing", choices=TYPINGS, help="trt: builder flags or strong typing (default auto)")
    p.add_argument("--min-batch", type=positive_int, help="trt profile, images per batch (default 1)")
    p.add_argument("--opt-batch", type=positive_int, help="trt profile, images per batch (default 64)")
    p.add_argument("--max-batch", type=positive_int, help="trt profile, images per batch (default 64)")
    p.add_argument("--workspace-gib", type=float, help="trt builder memory-pool limit (default 8)")
    p.add_argument("--timing-cache", help="trt timing cache file (read if present, then updated)")
    p.add_argument("--device", help="trt: the GPU to build for (default cuda)")
    return p


def _trt_options(args: argparse.Namespace) -> None:
    """Refuse TensorRT options with --format onnx (they were ignored without a word), fill in their
    defaults for trt, and check the profile and memory pool before the export, not after it."""
    given = [name for name in TRT_DEFAULTS if getattr(args, name) is not None]
    if args.format == "onnx":
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise VigfaceError(f"{flags}: TensorRT build options; they go with --format trt")
        return
    for name, value in TRT_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    from vigface.engines.trt import check_build_options

    check_build_options(((args.min_batch, args.opt_batch, args.max_batch),), args.workspace_gib)
    if args.out and Path(args.out).suffix == ".onnx":  # the graph beside it would be the plan itself
        raise VigfaceError(f"--out {args.out}: a TensorRT plan is not an ONNX graph; name it .plan")


def trt_graph_path(plan: Path) -> Path:
    """Where the ONNX graph a plan is built from goes: beside the plan, under a name of its own. (It
    went to <plan>.onnx, for the default plan the onnx engine's denoiser.onnx, which a bf16 graph
    then replaced: --engine onnx failed on it.)"""
    return plan.with_suffix(".trt.onnx")


def _export(args: argparse.Namespace) -> int:
    import torch

    from vigface.diffusion.sampling import FaceSampler, engine_artifacts
    from vigface.engines.export import export_onnx, graph_opset, onnxruntime_max_error, state_sha256
    from vigface.engines.sidecar import sidecar_path, write_sidecar

    if args.format == "onnx" and args.precision != "fp32":
        raise VigfaceError("--precision: the onnx export is float32; reduced precision is for --format trt")
    if args.onnx and args.format != "trt":
        raise VigfaceError("--onnx is an input of --format trt")
    if args.trust_onnx and not args.onnx:
        raise VigfaceError("--trust-onnx goes with --onnx GRAPH")
    _trt_options(args)
    name = "denoiser.onnx" if args.format == "onnx" else "denoiser.plan"
    check_output_file("--out", args.out, f" (e.g. its {name})")  # before the export, not at its rename
    sampler = FaceSampler.load(args.model, "cpu", "eager")
    denoiser, model_sha = sampler.denoiser, state_sha256(sampler.denoiser)
    artifacts = engine_artifacts(args.model)
    out = Path(args.out) if args.out else artifacts[args.format]
    inputs, engines = [args.model, args.onnx], artifacts["onnx"].parent.name  # where exports go, by default
    refuse_writing_over_inputs("--out", [out], inputs, engines)
    refuse_writing_over_inputs(f"--out {out}: its sidecar", [sidecar_path(out)], inputs, engines)
    out.parent.mkdir(parents=True, exist_ok=True)

    typing = args.typing
    if args.format == "trt":  # resolve "auto" now: strong typing needs a graph exported in that dtype
        from vigface.engines.trt import import_tensorrt, resolve_typing

        try:
            typing = resolve_typing(import_tensorrt(), args.precision, typing)
        except BackendUnavailableError:
            pass  # reported by the build, after the ONNX graph is written and checked
    if args.onnx:
        onnx_bytes, checked, graph_dtype = _onnx_input(Path(args.onnx), denoiser, model_sha, args.trust_onnx)
        exporter = f"file {args.onnx}"
    else:
        strong = args.format == "trt" and args.precision in ("bf16", "fp16") and typing == "strong"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.precision] if strong else torch.float32
        onnx_bytes, exporter = export_onnx(denoiser, opset=args.opset, exporter=args.exporter, dtype=dtype)
        graph_dtype = str(dtype).removeprefix("torch.")
        checked = None
        if dtype == torch.float32:
            checked = onnxruntime_max_error(onnx_bytes, denoiser)
            if not checked <= ONNX_TOLERANCE:
                raise VigfaceError(
                    f"the exported ONNX graph differs from the model by {checked:.3g} in onnxruntime "
                    f"(tolerance {ONNX_TOLERANCE}); not written"
                )
        diff = "not checked (reduced-precision graph)" if checked is None else f"{checked:.2e}"
        print(f"ONNX ({exporter} exporter, opset {args.opset}): onnxruntime vs torch max |diff| = {diff}")
    onnx_path = out if args.format == "onnx" else trt_graph_path(out)
    # what a kill -9 of an earlier export left (every other way out removes its own temporaries)
    remove_stale_temporaries(
        out.parent, own={n for p in (out, onnx_path) for n in (p.name, sidecar_path(p).name)}
    )
    write_atomically(onnx_path, onnx_bytes)
    write_sidecar(
        onnx_path,
        {"model_sha256": model_sha, "exporter": exporter, "opset": graph_opset(onnx_bytes) or args.opset,
         "dtype": graph_dtype, "torch": torch.__version__, "onnxruntime_max_abs_diff": checked},
    )  # fmt: skip
    print(f"wrote {onnx_path}")
    if args.format == "onnx":
        return 0

    from vigface.engines.trt import build_trt_engine

    try:
        plan = build_trt_engine(
            onnx_bytes, out, config=denoiser.config, precision=args.precision, model_sha256=model_sha,
            exporter=exporter, typing=typing, profiles=((args.min_batch, args.opt_batch, args.max_batch),),
            workspace_gib=args.workspace_gib, timing_cache=args.timing_cache, device=args.device,
        )  # fmt: skip
    except BackendUnavailableError as err:  # the graph above is still of use where TensorRT is
        raise BackendUnavailableError(
            f"{err}. The ONNX graph is written ({onnx_path}); build the engine from it where TensorRT "
            f"and a GPU are: vigface-export --model {args.model} --format trt --onnx {onnx_path}"
        ) from None
    print(f"wrote {plan}")
    return 0


def _onnx_input(path: Path, denoiser, model_sha: str, trust: bool) -> tuple[bytes, float | None, str | None]:
    """The graph given with --onnx, its max |onnxruntime - torch| and its dtype (when a vigface
    sidecar records it), refused unless it is this
    model's: a graph vigface-export wrote must name this model in its sidecar; any other graph must
    run in onnxruntime and agree with the model, or be taken on --trust-onnx (unchecked, said so).
    (Any file used to be taken, then written as the model's own graph under a sidecar naming this
    model, so vigface-gen --engine onnx ran another model's weights.)"""
    from vigface.engines.export import onnxruntime_errors
    from vigface.engines.sidecar import read_sidecar, sidecar_path

    if not path.is_file():
        raise DataFormatError(path, "--onnx: no such file")
    data = path.read_bytes()
    _check_parses_as_onnx(path, data)  # a cut graph beside its sidecar was taken too
    if sidecar_path(path).is_file():
        facts = read_sidecar(path)
        if facts.get("model_sha256") != model_sha:
            raise VigfaceError(
                f"--onnx {path}: exported from another model (its sidecar's model_sha256 "
                f"{str(facts.get('model_sha256'))[:12]}..., this model's {model_sha[:12]}...); export "
                f"this model's graph with vigface-export --model M (then --format trt --onnx it)"
            )
        return data, facts.get("onnxruntime_max_abs_diff"), facts.get("dtype")
    if trust:
        warnings.warn(
            VigfaceWarning(f"--onnx {path}: taken on --trust-onnx, not checked against the model"),
            stacklevel=2,
        )
        return data, None, None
    advice = (
        "for a graph onnxruntime's CPU cannot run (bf16, TensorRT plugins) that you know is this "
        "model's, pass --trust-onnx"
    )
    try:
        max_abs, relative = onnxruntime_errors(data, denoiser)
    except BackendUnavailableError as exc:
        raise BackendUnavailableError(
            f"--onnx {path}: cannot be checked against the model: {exc}; {advice}"
        ) from None
    except Exception as exc:  # onnxruntime's own error types: another graph, unsupported ops or types
        why = first_line(exc)
        raise DataFormatError(
            path, f"--onnx: onnxruntime cannot run it as this denoiser ({why}); {advice}"
        ) from None
    if not relative <= FOREIGN_ONNX_TOLERANCE:
        raise DataFormatError(
            path,
            f"--onnx: does not compute this model: in onnxruntime its output differs from the model's by "
            f"{relative:.1%} RMS (relative; up to {FOREIGN_ONNX_TOLERANCE:.0%} is taken, for a "
            f"reduced-precision graph of the same weights)",
        )
    return data, max_abs, None


def _check_parses_as_onnx(path: Path, data: bytes) -> None:
    """Refuse bytes that are no ONNX model at all (when the onnx package is here to tell)."""
    try:
        import onnx
    except ImportError:
        return
    try:
        onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf's DecodeError and kin
        raise DataFormatError(path, f"--onnx: not an ONNX model ({type(exc).__name__})") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, _export, args)


if __name__ == "__main__":
    sys.exit(main())
