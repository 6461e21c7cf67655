"""bench/sample_throughput.py's compute floor: the FLOPs it charges a denoiser forward."""

from types import SimpleNamespace

import torch
from script_module import load_script
from torch.utils.flop_counter import FlopCounterMode

from vigface.diffusion.denoiser import Denoiser


def _load_script():
    return load_script("bench/sample_throughput.py")


def test_floor_counts_attention_flops():
    """The FLOP counter has no rule for the CPU SDPA kernel: attention counted as nothing made the
    ViT-B/4 floor 155.7 GFLOP per image instead of 180.2. The count must hold, per attention layer,
    QK^T and AV: 2 x 2 L^2 D multiply-adds by hand."""
    bench = _load_script()
    args = SimpleNamespace(arch="uvit", image_size=None, size="tiny")
    config = bench.model_config(args)
    model = Denoiser(config).eval()
    s = config.image_size
    inputs = (
        torch.randn(1, 3, s, s),
        torch.tensor([500]),
        torch.randn(1, config.cond_dim),
        torch.rand(1, 5, s, s),
    )
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    without_attention = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert not any("attention" in op for op in without_attention)  # the counter's blind spot
    tokens = (s // config.patch) ** 2
    attention = config.depth * 4 * tokens * tokens * config.width
    assert bench.forward_flops(args) == sum(without_attention.values()) + attention


def test_bad_arguments_are_one_argparse_error_and_the_baseline_runs_first(monkeypatch, capsys):
    """--engines bogus (KeyError), --samplers ddim:0 / ddim / bogus:2 (VigfaceError, ValueError),
    --batch 0 (ZeroDivisionError) ended in tracebacks; a misspelt --baseline gave no speed-up
    columns without a word, and a baseline listed after another engine gave that one none."""
    import sys

    import pytest

    bench = _load_script()
    for argv, message in (
        (["--engines", "bogus"], "--engines 'bogus': choose among eager"),
        (["--samplers", "ddim:0"], "--samplers 'ddim:0': expected NAME:STEPS"),
        (["--samplers", "ddim"], "--samplers 'ddim': expected NAME:STEPS"),
        (["--samplers", "bogus:2"], "--samplers 'bogus:2'"),
        (["--batch", "0"], "--batch: '0' must be at least 1"),
        (["--baseline", "egaer:fp32"], "--baseline 'egaer:fp32': its engine is not among --engines"),
    ):
        monkeypatch.setattr(sys, "argv", ["sample_throughput.py", "--size", "tiny", *argv])
        with pytest.raises(SystemExit) as stop:
            bench.main()
        assert stop.value.code == 2 and message in capsys.readouterr().err
    args = SimpleNamespace(samplers="ddim:2", engines="onnx,eager", baseline="eager:fp32", precisions=None)
    for given in (True, False):
        args.baseline_given = given
        bench.check_args(None, args, torch.device("cpu"))
        assert args.engines == "eager,onnx"
    # a default baseline whose engine is not measured drops the columns (--engines trt ran before)
    args = SimpleNamespace(samplers="ddim:2", engines="trt", baseline="eager:fp32", precisions=None)
    args.baseline_given = False
    bench.check_args(None, args, torch.device("cpu"))
    monkeypatch.setattr(sys, "argv", ["sample_throughput.py", "--size", "tiny", "--baseline", "eager:bf16"])
    with pytest.raises(SystemExit):
        bench.main()
    assert "--baseline 'eager:bf16': eager runs fp32 here" in capsys.readouterr().err
