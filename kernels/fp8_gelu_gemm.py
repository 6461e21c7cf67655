"""The fp8 MLP's first linear, GELU and the second linear's input quantisation as one Triton GEMM.

    h_q = e4m3( clamp( gelu_tanh( (x_q @ w_q^T) * s_x * s_w + b ) / s_h, -448, 448 ) )

x_q (M, K) and w_q (N, K) are e4m3 with per-tensor float32 scales s_x, s_w (engines/fp8.py's
Fp8Linear: w_q is its weight_q, s_x its static input scale); s_h is the second linear's static
input scale, so h_q goes straight into that linear's fp8 GEMM. Why: with torch._scaled_mm the
(M, 4 D) hidden activations are written in bf16 by the GEMM, then read again by a separate pass
that applies GELU, divides by s_h and casts to e4m3 (Inductor fuses those, but not into the GEMM):
on a ViT-B/4 forward of 128 rows that pass took 6.9 of 46.1 ms on an H200
(bench/results/denoiser_profile_cuda_h200_run3.json). Here the accumulator goes through the
epilogue in registers and only the fp8 hidden activations (half the bf16 bytes) reach memory.

The GEMM: one program per BLOCK_M x BLOCK_N output tile (grouped along M so neighbouring programs
share w tiles in L2), walking K in BLOCK_K steps with fp32 accumulation. Both operands are
K-contiguous (x_q row-major, w_q row-major read as w_q^T), the layout Hopper's fp8 tensor-core
instructions need. GELU(tanh) is written as x * sigmoid(2 u), u = sqrt(2/pi) (x + 0.044715 x^3),
which is the same function (0.5 (1 + tanh u) = sigmoid(2 u)) without a tanh primitive. Inference only.

`fp8_gelu_gemm_ref` is the same computation in float32 PyTorch on the dequantised operands: the
test oracle. The kernel's sums differ from it: on a GPU the fp8 tensor cores keep about 14 bits of
the running sum and the kernel accumulates the whole K in them (cuBLAS's fp8 GEMM, as torch calls
it, adds partial sums into float32 every few instructions), so an output can land a few e4m3 steps
from the oracle's where it is small next to sum_k |x_k w_k| (the tests' bound says how far).
`promote_every=P` adds the partial sums into float32 every P K elements instead (Triton's
max_num_imprecise_acc), cuBLAS's way; compiled for sm_90 here, its speed not yet measured.

Measured on an H200 (bench/results/denoiser_profile_cuda_h200_fp8_gelu_gemm.json, ViT-B/4, 128
rows): 0.89 ms per call at M = 100,352, K = 768, N = 3,072 (535 TFLOP/s) where cuBLAS's fp8 GEMM
took 0.44 ms (1,070 TFLOP/s) and the GELU + quantisation pass 0.49 ms; the forward 46.1 -> 44.3 ms.
So the GEMM itself runs at half cuBLAS's rate: better tiles or TMA loads are where the next
milliseconds are. `tma=True` runs the same kernel with its tiles loaded and stored through TMA
descriptors (tested in the interpreter and compiled for sm_90 here, not yet run on a GPU);
bench/fp8_gelu_gemm.py times both over the candidate tiles, and the faster becomes the default.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from vigface.errors import BackendUnavailableError, VigfaceError

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("VIGFACE_AUTOTUNE", "1") != "0"
E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
# constants inside the kernel (Triton reads globals only as constexpr); ROUNDER: see _round_to_e4m3
SQRT_2_OVER_PI_C = tl.constexpr(SQRT_2_OVER_PI)
E4M3_MAX_C = tl.constexpr(E4M3_MAX)
ROUNDER = tl.constexpr(1.5 * 2.0**23)

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): Hopper fp8 GEMM tiles, autotuned per shape and variant; the
# first is pinned when VIGFACE_AUTOTUNE=0. First guesses in the range of Triton's fp8 matmul tutorial
# for H100, not searched further (the H200 run autotuned among these; which one won is not recorded).
TILES = [
    (128, 256, 128, 8, 3),
    (128, 128, 128, 8, 4),
    (256, 128, 128, 8, 3),
    (128, 128, 64, 4, 4),
    (64, 128, 128, 4, 4),
]


def _configs() -> list[triton.Config]:
    if INTERPRET:  # the interpreter runs programs serially in NumPy: one small tile, many programs
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, n, k, w, s in TILES
    ]
    return configs if AUTOTUNE else configs[:1]


@triton.autotune(configs=_configs(), key=["M", "N", "K", "HAS_BIAS", "PROMOTE_EVERY", "TMA"])
@triton.jit
def _fp8_gelu_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, scales_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr = 8, PROMOTE_EVERY: tl.constexpr = None, TMA: tl.constexpr = False,
):  # fmt: skip
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    wide_rows = rows.to(tl.int64)  # M x N passes 2^31 at ~890 ViT-B/4 rows (x 784 tokens x 3,072)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if TMA:
        # tiles moved by Hopper's tensor memory accelerator: one copy instruction per tile, parts
        # outside the matrix filled with zeros on load and dropped on store, so no masks
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])  # fmt: skip
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])  # fmt: skip
        for k0 in range(0, K, BLOCK_K):
            x = x_desc.load([pid_m * BLOCK_M, k0])
            w = w_desc.load([pid_n * BLOCK_N, k0])
            acc = tl.dot(x, w.T, acc, max_num_imprecise_acc=PROMOTE_EVERY)
    else:
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + wide_rows[:, None] * stride_xm + ks[None, :]  # (BLOCK_M, BLOCK_K)
        w_ptrs = w_ptr + cols[None, :] * stride_wn + ks[:, None]  # (BLOCK_K, BLOCK_N): w^T
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptrs, mask=(rows[:, None] < M) & (ks[None, :] < K - k0), other=0.0)
            w = tl.load(w_ptrs, mask=(cols[None, :] < N) & (ks[:, None] < K - k0), other=0.0)
            acc = tl.dot(x, w, acc, max_num_imprecise_acc=PROMOTE_EVERY)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
    y = _gelu_quantise_epilogue(acc, bias_ptr, scales_ptr, cols, N, HAS_BIAS).to(tl.float8e4nv)
    if TMA:
        out_desc = tl.make_tensor_descriptor(out_ptr, shape=[M, N], strides=[stride_om, 1],
                                             block_shape=[BLOCK_M, BLOCK_N])  # fmt: skip
        out_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], y)
    else:
        out_ptrs = out_ptr + wide_rows[:, None] * stride_om + cols[None, :]
        tl.store(out_ptrs, y, mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (row tile, column tile), in grouped order: GROUP_M row tiles share each
    column tile of w while it is in L2."""
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_rows
    pid_n = (pid % (GROUP_M * tiles_n)) // group_rows
    return pid_m, pid_n


@triton.jit
def _gelu_quantise_epilogue(acc, bias_ptr, scales_ptr, cols, N, HAS_BIAS: tl.constexpr):
    """In float32 registers: dequantise, bias, GELU(tanh), divide by s_h, clamp, round to e4m3."""
    dequant = tl.load(scales_ptr)  # s_x * s_w
    inv_out_scale = tl.load(scales_ptr + 1)  # 1 / s_h
    y = acc * dequant
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    u = SQRT_2_OVER_PI_C * (y + 0.044715 * y * y * y)
    y = y * tl.sigmoid(2.0 * u)
    y = tl.minimum(tl.maximum(y * inv_out_scale, -E4M3_MAX_C), E4M3_MAX_C)
    return _round_to_e4m3(y)


@triton.jit
def _round_to_e4m3(y):
    """y (float32, |y| <= 448) rounded half-to-even to the nearest e4m3 value, still as float32.

    The cast that follows is then exact. Why not let the cast round: Triton's interpreter rounds
    float32 -> e4m3 wrongly (half-up on one bit, and a mantissa carry lands in the exponent's low
    bit: 127.1 -> 64), so the tests could not check the GPU's rounding through it; with the
    rounding written out, the interpreter and the GPU run the same arithmetic. The e4m3 grid
    spacing is 2^(e - 3) for a binade 2^e, e >= -6, and 2^-9 (subnormals) below 2^-6."""
    exponent = tl.maximum((y.to(tl.int32, bitcast=True) >> 23) & 0xFF, 127 - 6)  # biased, >= 2^-6
    inv_spacing = ((257 - exponent) << 23).to(tl.float32, bitcast=True)  # 2^(130 - exponent)
    spacing = ((exponent - 3) << 23).to(tl.float32, bitcast=True)  # 2^(exponent - 130)
    # y * inv_spacing is exact and < 16 in magnitude; adding then subtracting 1.5 x 2^23 leaves it
    # rounded half-to-even to an integer by float32 addition itself (1 is the spacing at 2^23)
    integer = (y * inv_spacing + ROUNDER) - ROUNDER
    return integer * spacing  # a power of two: exact


def _check(x_q, w_q, bias, x_scale, w_scale, out_scale) -> None:
    if x_q.dtype != E4M3 or w_q.dtype != E4M3:
        raise VigfaceError(
            f"fp8_gelu_gemm: x_q and w_q must be float8_e4m3fn, got {x_q.dtype} and {w_q.dtype}"
        )
    if x_q.dim() != 2 or w_q.dim() != 2 or x_q.shape[1] != w_q.shape[1]:
        raise VigfaceError(
            "fp8_gelu_gemm: x_q (M, K) and w_q (N, K) must share K, "
            f"got {tuple(x_q.shape)} and {tuple(w_q.shape)}"
        )
    if x_q.stride(1) != 1 or w_q.stride(1) != 1:
        raise VigfaceError("fp8_gelu_gemm: x_q and w_q must be row-major (K contiguous)")
    if bias is not None and bias.shape != (w_q.shape[0],):
        raise VigfaceError(f"fp8_gelu_gemm: bias must have shape ({w_q.shape[0]},), got {tuple(bias.shape)}")
    for name, s in (("x_scale", x_scale), ("w_scale", w_scale), ("out_scale", out_scale)):
        if s.numel() != 1:
            raise VigfaceError(
                f"fp8_gelu_gemm: {name} must be one per-tensor scale, got shape {tuple(s.shape)}"
            )
    if x_q.device.type != "cuda" and not INTERPRET:
        raise BackendUnavailableError(
            f"fp8_gelu_gemm needs a CUDA device, got {x_q.device} "
            "(or TRITON_INTERPRET=1 before importing vigface.kernels, for the slow interpreter)"
        )


def fp8_gelu_gemm(
    x_q: torch.Tensor,
    w_q: torch.Tensor,
    bias: torch.Tensor | None,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    out_scale: torch.Tensor,
    tiles: tuple[int, int, int, int, int] | None = None,
    tma: bool = False,
    promote_every: int | None = None,
) -> torch.Tensor:
    """e4m3 (M, N): GELU(x_q w_q^T s_x s_w + bias) quantised at out_scale (see the module notes).
    tiles: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) instead of the autotuned choice (benchmarks);
    tma: the TMA-descriptor kernel (Hopper; a candidate, not yet measured against the default);
    promote_every: add the tensor cores' fp8 partial sums into float32 every this many K elements
    (Triton's max_num_imprecise_acc; None: never, the measured default), the way cuBLAS keeps its
    fp8 sums precise, at a speed cost not yet measured."""
    if promote_every is not None:
        # Triton splits each tile's dot at this many K elements: at most the tile's BLOCK_K
        block_k = tiles[2] if tiles is not None else min(c.kwargs["BLOCK_K"] for c in _configs())
        if promote_every < 32 or promote_every % 32 or promote_every > block_k:
            raise VigfaceError(
                f"fp8_gelu_gemm: promote_every must be a multiple of 32 up to BLOCK_K ({block_k}), "
                f"got {promote_every}"
            )
    _check(x_q, w_q, bias, x_scale, w_scale, out_scale)
    if tma:
        _check_tma(x_q, w_q)
    m, k = x_q.shape
    n = w_q.shape[0]
    out = torch.empty(m, n, dtype=E4M3, device=x_q.device)
    # the two scalars the epilogue needs, computed on the device: no host sync, graph-capturable
    scales = torch.stack([(x_scale * w_scale).reshape(()), 1.0 / out_scale.reshape(())]).float()
    bias_arg = bias if bias is not None else scales  # an unused pointer when HAS_BIAS is False

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    args = (x_q, w_q, bias_arg, out, scales, m, n, k, x_q.stride(0), w_q.stride(0), out.stride(0))
    constexprs = {"HAS_BIAS": bias is not None, "PROMOTE_EVERY": promote_every, "TMA": tma}
    if tiles is None:
        _fp8_gelu_gemm_kernel[grid](*args, **constexprs)
    else:
        block_m, block_n, block_k, warps, stages = tiles
        meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}
        _fp8_gelu_gemm_kernel.fn[grid(meta)](*args, **constexprs, **meta, num_warps=warps, num_stages=stages)
    return out


def _check_tma(x_q: torch.Tensor, w_q: torch.Tensor) -> None:
    """TMA copies need 16-byte aligned base addresses and row strides (K and N bytes in e4m3); the
    descriptors built on the device need global scratch memory, which Triton asks torch for."""
    n, k = w_q.shape[0], x_q.shape[1]
    if k % 16 or n % 16 or x_q.stride(0) % 16 or w_q.stride(0) % 16:
        raise VigfaceError(
            f"fp8_gelu_gemm(tma=True): K ({k}), N ({n}) and the row strides must be multiples of 16"
        )
    if x_q.data_ptr() % 16 or w_q.data_ptr() % 16:
        raise VigfaceError("fp8_gelu_gemm(tma=True): x_q and w_q must start on 16-byte boundaries")
    if x_q.is_cuda:
        if not hasattr(triton, "set_allocator"):
            raise BackendUnavailableError(
                "fp8_gelu_gemm(tma=True): device-side TMA descriptors need triton.set_allocator, "
                f"which Triton {triton.__version__} lacks"
            )
        triton.set_allocator(_descriptor_scratch)


def _descriptor_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def fp8_gelu_gemm_ref(
    x_q: torch.Tensor,
    w_q: torch.Tensor,
    bias: torch.Tensor | None,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    out_scale: torch.Tensor,
) -> torch.Tensor:
    """The same in float32 PyTorch on the dequantised operands (the oracle)."""
    y = (x_q.float() @ w_q.float().t()) * (x_scale.float() * w_scale.float())
    if bias is not None:
        y = y + bias.float()
    y = F.gelu(y, approximate="tanh")
    return (y / out_scale.float()).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


# Under torch.compile the kernel runs as this custom op: opaque to Dynamo and Inductor, which
# would otherwise trace the autotuner's Python; the fake implementation gives the output's shape.
@torch.library.custom_op("vigface::fp8_gelu_gemm", mutates_args=())
def fp8_gelu_gemm_op(
    x_q: torch.Tensor,
    w_q: torch.Tensor,
    bias: torch.Tensor | None,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    out_scale: torch.Tensor,
) -> torch.Tensor:
    return fp8_gelu_gemm(x_q, w_q, bias, x_scale, w_scale, out_scale)


@fp8_gelu_gemm_op.register_fake
def _fp8_gelu_gemm_op_fake(x_q, w_q, bias, x_scale, w_scale, out_scale):
    return x_q.new_empty(x_q.shape[0], w_q.shape[0], dtype=E4M3)
