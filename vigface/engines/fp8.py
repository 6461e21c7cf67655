"""fp8 (e4m3) linears for the compile engine: per-tensor scales and torch._scaled_mm.

    y = (x / s_x).to(e4m3) @ (W / s_w).to(e4m3)^T * s_x * s_w + b,   s = amax / 448

The weight is quantised once, with its own scale. The activation scale is either dynamic, the
amax of each call's input computed on the device (no host sync, but a reduction over the whole
activation before its cast: an extra pass per linear), or static: fixed after a calibration that
records each linear's largest |input| over real calls (`calibrate_fp8`), with `headroom` above it;
larger values saturate at +-448 s. A static scale turns the quantisation into one element-wise
multiply + cast that Inductor can fuse into the kernel producing the activation. 448 is the largest
finite e4m3 value. `fp8_linear_ref` is the same quantisation with the product done in float32 on
the dequantised values: the oracle the _scaled_mm path is tested against.

A block's MLP becomes an `Fp8Mlp`; with `fused_mlp` its first linear, GELU and the second linear's
input quantisation run as one Triton GEMM (vigface.kernels.fp8_gelu_gemm) once the scales are static.

On an H100 the e4m3 tensor cores run 2x the bf16 rate; on a CPU torch's _scaled_mm exists but is
only for checking numbers. Only linears whose in and out widths are multiples of 16 (cuBLASLt's
fp8 alignment) are converted, and only inside the transformer blocks: the AdaLN modulation, the
timestep MLP and the output layer stay in the model's precision (small, and sensitive).
"""

from __future__ import annotations

import torch
from torch import nn

from vigface.errors import BackendUnavailableError

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


def quantize_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor e4m3 quantisation: (x / s clamped to +-448 as e4m3, the float32 scale s)."""
    scale = (x.detach().abs().amax().float() / E4M3_MAX).clamp_min(1e-12)
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def quantize_e4m3_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale as e4m3, saturating at +-448 (the calibrated scale's quantisation)."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def fp8_linear_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, x_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """The quantised linear in float32 on dequantised values (the oracle); x_scale: a static
    activation scale (default: dynamic, x's own amax)."""
    if x_scale is None:
        xq, sx = quantize_e4m3(x)
    else:
        xq, sx = quantize_e4m3_static(x, x_scale), x_scale
    wq, sw = quantize_e4m3(weight)
    y = (xq.float() * sx) @ (wq.float() * sw).t()
    return (y if bias is None else y + bias.float()).to(x.dtype)


def fp8_supported(device: torch.device) -> tuple[bool, str]:
    """fp8 matmuls need Ada/Hopper tensor cores (sm_89+) on CUDA; torch's CPU _scaled_mm always works."""
    if device.type == "cpu":
        return True, "torch CPU _scaled_mm (numbers only, not speed)"
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap >= (8, 9):
            return True, f"sm_{cap[0]}{cap[1]} fp8 tensor cores"
        return False, f"fp8 matmuls need an sm_89+ GPU (Ada/Hopper); this one is sm_{cap[0]}{cap[1]}"
    return False, f"fp8 is not offered on {device.type}"


class Fp8Linear(nn.Module):
    """nn.Linear with an e4m3 weight and e4m3 activations through torch._scaled_mm; the activation
    scale is dynamic until `calibrate_fp8` fixes it."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight_q, weight_scale = quantize_e4m3(linear.weight)
        self.register_buffer("weight_q", weight_q)  # (out, in) row-major: its .t() is column-major
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("input_scale", None)  # set by calibrate_fp8: then static
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), False)
        self.out_dtype = linear.weight.dtype
        self.observed_amax: torch.Tensor | None = None  # recorded while calibrating

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.input_scale is not None:
            xq, x_scale = quantize_e4m3_static(x2, self.input_scale), self.input_scale
        else:
            xq, x_scale = quantize_e4m3(x2)
            if self.observed_amax is not None:
                self.observed_amax = torch.maximum(self.observed_amax, x_scale * E4M3_MAX)
        y = self.quantized_matmul(xq, x_scale)
        return y.view(*shape[:-1], y.shape[-1])

    def quantized_matmul(self, xq: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        """The layer on an input already in e4m3 at x_scale: xq (M, in) -> (M, out)."""
        # the bias rides in the GEMM's epilogue where cuBLASLt takes it (16-bit outputs)
        fused_bias = self.bias is not None and self.out_dtype in (torch.bfloat16, torch.float16)
        y = torch._scaled_mm(
            xq,
            self.weight_q.t(),
            scale_a=x_scale,
            scale_b=self.weight_scale,
            bias=self.bias if fused_bias else None,
            out_dtype=self.out_dtype,
        )
        if self.bias is not None and not fused_bias:
            y = y + self.bias
        return y


class Fp8Mlp(nn.Sequential):
    """A block's MLP (Linear, GELU(tanh), Linear) with both linears in fp8, in the same three slots.

    fused=True: once both activation scales are static, the first linear, the GELU and the second
    linear's input quantisation run as one Triton GEMM (vigface.kernels.fp8_gelu_gemm, CUDA or the
    Triton interpreter) whose e4m3 output the second linear takes as it is: the bf16 hidden
    activations are never written. Otherwise (fused=False, dynamic scales, or the calibration call,
    which must see the GELU's output to record the second linear's input range) the three modules
    run in turn, the reference of the fused path."""

    def __init__(self, mlp: nn.Sequential, fused: bool):
        fc1, gelu, fc2 = mlp
        super().__init__(Fp8Linear(fc1), gelu, Fp8Linear(fc2))
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1, _, fc2 = self
        if not (self.fused and fc1.input_scale is not None and fc2.input_scale is not None):
            return super().forward(x)
        from vigface.kernels.fp8_gelu_gemm import fp8_gelu_gemm_op  # triton: only when fused

        shape = x.shape
        xq = quantize_e4m3_static(x.reshape(-1, shape[-1]), fc1.input_scale)
        hq = fp8_gelu_gemm_op(xq, fc1.weight_q, fc1.bias, fc1.input_scale, fc1.weight_scale, fc2.input_scale)
        y = fc2.quantized_matmul(hq, fc2.input_scale)
        return y.view(*shape[:-1], y.shape[-1])


@torch.no_grad()
def calibrate_fp8(model: nn.Module, run, headroom: float = 2.0):
    """Runs `run()` (real calls of `model`) with dynamic scales, recording every Fp8Linear's largest
    |input|; then fixes each one's activation scale at headroom x that / 448. Returns run()'s result."""
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    for layer in layers:
        layer.input_scale = None
        layer.observed_amax = torch.zeros((), device=layer.weight_q.device)
    try:
        result = run()
    finally:
        observed = [layer.observed_amax for layer in layers]
        for layer in layers:
            layer.observed_amax = None
    for layer, amax in zip(layers, observed, strict=True):
        layer.input_scale = (amax * headroom / E4M3_MAX).clamp_min(1e-12)
    return result


def convertible(layer: nn.Linear) -> bool:
    return layer.in_features % 16 == 0 and layer.out_features % 16 == 0


def is_tanh_gelu_mlp(mlp: nn.Module) -> bool:
    """Whether mlp is (Linear, GELU(tanh), Linear) with fp8-convertible widths: an Fp8Mlp's shape."""
    if not isinstance(mlp, nn.Sequential) or len(mlp) != 3:
        return False
    fc1, gelu, fc2 = mlp
    linears = all(isinstance(fc, nn.Linear) and convertible(fc) for fc in (fc1, fc2))
    return linears and isinstance(gelu, nn.GELU) and gelu.approximate == "tanh"


def convert_block_linears_to_fp8(model: nn.Module, fused_mlp: bool = False) -> int:
    """Swap the attention/MLP/skip linears of every AdaLN block for Fp8Linear, in place; returns the
    count. Each block's MLP becomes an Fp8Mlp (fused_mlp: its fused GELU GEMM, see Fp8Mlp)."""
    if not hasattr(torch, "_scaled_mm"):
        raise BackendUnavailableError("fp8 linears need torch._scaled_mm, which this torch lacks")
    count = 0
    for block in model.modules():
        if not hasattr(block, "ada"):  # AdaLN blocks (and the final layer, which has final_ada) only
            continue
        if is_tanh_gelu_mlp(getattr(block, "mlp", None)):
            block.mlp = Fp8Mlp(block.mlp, fused_mlp)
            count += 2
        for name, child in list(block.named_modules()):  # Fp8Linear is no nn.Linear: the MLP's are skipped
            if name.startswith("ada") or not isinstance(child, nn.Linear) or not convertible(child):
                continue
            parent = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
            setattr(parent, name.rpartition(".")[2], Fp8Linear(child))
            count += 1
    return count
