"""bench/sample_throughput.py's compute floor: the FLOPs it charges a denoiser forward."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

from vigface.diffusion.denoiser import Denoiser

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "sample_throughput.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("sample_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
