"""Fused margin-softmax cross-entropy over (real + virtual) prototypes, without the N x C logits.

For N rows e_i (unit embeddings, D wide) and C unit prototypes w_j (this rank's shard), the
margin softmax of VIGFace's head (`vigface/fr/prototypes.py`, paper eq. 3) is

    z_ij = s * cos_ij,  cos_ij = <e_i, w_j>    every class but the target y_i
    z_iy = t_i = s * margin(cos_iy)            the target (ArcFace / CosFace / AdaFace / ...)
    loss_i = LSE_j(z_ij) - t_i                 LSE over the classes of *all* ranks

`margin` is any elementwise function of the target cosine, here `MarginHead.target_cosine` with
insightface's theta + m > pi continuation: it touches N values, so it runs in PyTorch and its
derivative comes from autograd on those N values. What needs the N x C matrix runs blockwise:

    forward   per (row block, class split): logit tiles by tl.dot, online max / sum-exp      1 matmul
    backward  dW kernel: per class block, loop over rows, recompute tiles, dW += dZ^T E      2 matmuls
              dE kernel: per (row block, class split), recompute tiles, dE += dZ W          2 matmuls
    with      dZ_ij = g_i * s * exp(z_ij - LSE_i) off the target, 0 on it; the target's
              g_i (p_iy - 1) margin'(cos_iy) is added in fp32 beside the kernels' sums.

Nothing of size N x C is stored: the forward keeps (max, sum-exp) per row and class split, the
backward recomputes logit tiles (as flash attention does). Memory model (fp32): the reference
makes five or so N x C fp32 tensors (cosines, margin logits, exp, saved probabilities, their
gradient), about three of them alive at its peak (measured on CPU, bench/margin_softmax.py);
the fused path holds O(N x (splits + D)) beside the C x D gradient of W that every
implementation writes. Time model: 5 N x C x D matmuls instead of 3, but no N x C memory
traffic (the reference reads or writes an N x C fp32 matrix about 20 times, counted from its ops).

Partial FC: with classes sharded over ranks every rank computes its local (max, sum-exp), then
one all-reduce of the max and one of the rescaled sum give the global LSE; the backward needs no
collective (each rank owns its W rows; the embedding gradient is summed by `gather_rows`).

Virtual rows (VIGFace Fig. 2): rows [num_real_rows, N) are virtual embeddings, constants whose
loss may train only the virtual prototypes, columns >= first_virtual_col. The kernels zero their
dW share for real columns and compute no dE for them, so real and virtual rows go in one call and
W is read once for both.

`margin_cross_entropy_ref` is the plain PyTorch reference (materialised logits, the head's own
`sharded_cross_entropy`): the test oracle and the benchmark baseline.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from vigface.errors import BackendUnavailableError, VigfaceError
from vigface.fr.distributed import sharded_cross_entropy, world

# `triton.jit` reads TRITON_INTERPRET when this module is imported, so that is when it counts.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
IMPLS = ("fused", "reference")
# The margin: target cosines (N,) fp32 -> margin cosines (N,), elementwise and differentiable.
MarginFn = Callable[[torch.Tensor], torch.Tensor]


# ---- tuning (pinned; one place) -----------------------------------------------------------------


@dataclass(frozen=True)
class MarginSoftmaxTuning:
    block_n: int  # rows per logit tile
    block_c: int  # classes per logit tile
    block_d: int  # embedding chunk of each logit dot
    block_c_grad_w: int  # classes per dW program
    block_d_grad_w: int  # embedding slice of a dW accumulator: block_c_grad_w x this fp32 values live
    block_d_grad_e: int  # embedding slice of a dE accumulator: block_n x this fp32 values live
    programs: int  # aim for about this many programs when splitting the classes (0: 4 x SMs)
    num_warps: int


# GPU, tuned on an H200 by bench/margin_softmax_tune.py (bench/results/margin_softmax_tune_cuda.json:
# B = 512, C = 100k, D = 512, forward + backward; every candidate checked against the reference).
# fp32 operands with IEEE dots (PyTorch's default fp32 matmul): no tensor cores, 35.8 ms against
# 39.8 ms for the first guess (64 x 128 x 64 tiles, dW slice 256, dE slice 128).
GPU_TUNING = MarginSoftmaxTuning(
    block_n=64,
    block_c=128,
    block_d=64,
    block_c_grad_w=64,
    block_d_grad_w=512,
    block_d_grad_e=256,
    programs=0,
    num_warps=8,
)
# Tensor-core dots (fp32 operands under allow_tf32, and 16-bit operands): 4.05 ms against 5.75 ms
# for the first guess. The dW slice stays at 256: at 512 with 128-row tiles the kernel needs more
# shared memory than an H200 has. Hopper only: the fp32 dE kernel needs 192 KiB of shared memory,
# over an A100's 163 KiB, so sm_8x takes GPU_TUNING for every dot (gpu_tuning).
GPU_TUNING_TF32 = MarginSoftmaxTuning(
    block_n=128,
    block_c=128,
    block_d=64,
    block_c_grad_w=32,
    block_d_grad_w=256,
    block_d_grad_e=256,
    programs=0,
    num_warps=8,
)
# Interpreter (CPU tests): small tiles so test shapes cover several row, class and embedding
# blocks, class splits and ragged edges; the interpreter's cost is per block operation.
INTERPRETER_TUNING = MarginSoftmaxTuning(
    block_n=16,
    block_c=32,
    block_d=16,
    block_c_grad_w=32,
    block_d_grad_w=16,
    block_d_grad_e=16,
    programs=4,
    num_warps=4,
)


# Interpreter at benchmark sizes (D = 512, C >= 10k): whole-D tiles, no class splits, so the
# interpreter runs few, large numpy block operations. For CPU benchmarks only.
INTERPRETER_LARGE_TUNING = MarginSoftmaxTuning(
    block_n=64,
    block_c=512,
    block_d=512,
    block_c_grad_w=512,
    block_d_grad_w=512,
    block_d_grad_e=512,
    programs=1,
    num_warps=4,
)


def gpu_tuning(capability: tuple[int, int], precision: str) -> MarginSoftmaxTuning:
    """The pinned tiles for a GPU of this compute capability and dots of this precision."""
    return GPU_TUNING_TF32 if precision != "ieee" and capability >= (9, 0) else GPU_TUNING


def default_tuning(device: torch.device, dtype: torch.dtype = torch.float32) -> MarginSoftmaxTuning:
    """The pinned tiles for the device and the dots the kernels will run (see _dot_modes)."""
    if device.type != "cuda":
        return INTERPRETER_TUNING
    return gpu_tuning(torch.cuda.get_device_capability(device), _dot_modes(dtype, device)[0])


# ---- backend choice -----------------------------------------------------------------------------


def fused_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on `device` (None when they can)."""
    if device.type == "cuda":
        return None
    if device.type == "cpu" and INTERPRETED:
        return None
    if device.type == "cpu":
        return (
            "the fused margin-softmax loss needs a CUDA device, or TRITON_INTERPRET=1 in the "
            "environment before vigface.kernels is imported (Triton's CPU interpreter, slow: tests only)"
        )
    return f"the fused margin-softmax loss has no kernels for device type {device.type!r}"


# ---- the reference: materialised logits ---------------------------------------------------------


def plain_margin(cos: torch.Tensor) -> torch.Tensor:
    """No margin: the target keeps its cosine (plain normalised softmax)."""
    return cos


def margin_cross_entropy_ref(
    rows: torch.Tensor,
    weight: torch.Tensor,
    target_index: torch.Tensor,
    scale: float,
    margin: MarginFn = plain_margin,
    *,
    num_real_rows: int | None = None,
    first_virtual_col: int = 0,
) -> torch.Tensor:
    """Per-row loss (N,) fp32 from the full (N, C) logit matrix, as the head's reference path."""
    n = rows.shape[0]
    r = n if num_real_rows is None else num_real_rows
    cos = rows[:r] @ weight.T  # (R, C)
    if r < n:  # virtual rows are constants and reach only the virtual columns' prototypes (Fig. 2)
        cols = torch.arange(weight.shape[0], device=weight.device)
        w_virtual = torch.where((cols >= first_virtual_col)[:, None], weight, weight.detach())
        cos = torch.cat([cos, rows[r:].detach() @ w_virtual.T])
    cos = cos.float()  # (N, C)
    has = target_index >= 0
    col = target_index.clamp_min(0)
    target_logit = scale * margin(cos.gather(1, col[:, None])[:, 0])
    onehot = torch.zeros_like(cos, dtype=torch.bool)
    onehot.scatter_(1, col[:, None], has[:, None])
    logits = torch.where(onehot, target_logit[:, None], scale * cos)
    return sharded_cross_entropy(logits, target_index)


# ---- kernels ------------------------------------------------------------------------------------


@triton.jit
def _logit_tile(
    rows_ptr,
    weight_ptr,
    offs_n,
    offs_c,
    N,
    C,
    D,
    stride_r,
    stride_w,
    scale,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,
):
    """s * <e_n, w_c> for a (BLOCK_N, BLOCK_C) tile, fp32; zero outside [0, N) x [0, C)."""
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    row_base = rows_ptr + offs_n.to(tl.int64)[:, None] * stride_r
    col_base = weight_ptr + offs_c.to(tl.int64)[:, None] * stride_w
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        e = tl.load(row_base + offs_d[None, :], mask=(offs_n[:, None] < N) & (offs_d[None, :] < D), other=0.0)
        w = tl.load(col_base + offs_d[None, :], mask=(offs_c[:, None] < C) & (offs_d[None, :] < D), other=0.0)
        if WIDEN:  # see WIDEN in the launchers
            acc = tl.dot(e.to(tl.float32), tl.trans(w).to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(e, tl.trans(w), acc, input_precision=PRECISION)
    return scale * acc


@triton.jit
def _lse_forward_kernel(
    rows_ptr,
    weight_ptr,
    target_ptr,
    target_logit_ptr,
    max_out_ptr,
    sum_out_ptr,
    N,
    C,
    D,
    stride_r,
    stride_w,
    scale,
    cols_per_split,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,
):
    """Per (row block, class split): running max and sum of exp(z - max) over the split's classes."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    target = tl.load(target_ptr + offs_n, mask=row_ok, other=-1)
    target_logit = tl.load(target_logit_ptr + offs_n, mask=row_ok, other=0.0).to(tl.float32)
    c_lo = split * cols_per_split
    c_hi = tl.minimum(c_lo + cols_per_split, C)
    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        z = _logit_tile(
            rows_ptr, weight_ptr, offs_n, offs_c, N, C, D, stride_r, stride_w, scale,
            BLOCK_N, BLOCK_C, BLOCK_D, PRECISION, WIDEN,
        )  # fmt: skip
        z = tl.where(offs_c[None, :] == target[:, None], target_logit[:, None], z)
        z = tl.where(offs_c[None, :] < c_hi, z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))  # finite: every tile has a live column
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
    tl.store(max_out_ptr + split * N + offs_n, run_max, mask=row_ok)
    tl.store(sum_out_ptr + split * N + offs_n, run_sum, mask=row_ok)


@triton.jit
def _grad_logit_tile(
    z,
    offs_n,
    offs_c,
    target,
    lse,
    grad,
    N,
    C,
    scale,
    num_real_rows,
    first_virtual_col,
):
    """dLSE/dcos on a tile: g * s * softmax, zero on the target column, edges and Fig. 2's cut."""
    d_cos = (grad * scale)[:, None] * tl.exp(z - lse[:, None])
    live = (offs_n[:, None] < N) & (offs_c[None, :] < C) & (offs_c[None, :] != target[:, None])
    trains = (offs_n[:, None] < num_real_rows) | (offs_c[None, :] >= first_virtual_col)
    return tl.where(live & trains, d_cos, 0.0)


@triton.jit
def _grad_weight_kernel(
    rows_ptr,
    weight_ptr,
    target_ptr,
    lse_ptr,
    grad_ptr,
    grad_w_ptr,
    N,
    C,
    D,
    stride_r,
    stride_w,
    scale,
    num_real_rows,
    first_virtual_col,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DW: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,
):
    """dW[c block, d slice] = sum over all rows of dZ^T E; each program owns its rows of dW."""
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_dw = pid_d * BLOCK_DW + tl.arange(0, BLOCK_DW)
    acc = tl.zeros((BLOCK_C, BLOCK_DW), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        row_ok = offs_n < N
        target = tl.load(target_ptr + offs_n, mask=row_ok, other=-1)
        lse = tl.load(lse_ptr + offs_n, mask=row_ok, other=0.0)
        grad = tl.load(grad_ptr + offs_n, mask=row_ok, other=0.0)
        z = _logit_tile(
            rows_ptr, weight_ptr, offs_n, offs_c, N, C, D, stride_r, stride_w, scale,
            BLOCK_N, BLOCK_C, BLOCK_D, PRECISION, WIDEN,
        )  # fmt: skip
        d_cos = _grad_logit_tile(
            z, offs_n, offs_c, target, lse, grad, N, C, scale, num_real_rows, first_virtual_col
        )
        e = tl.load(
            rows_ptr + offs_n.to(tl.int64)[:, None] * stride_r + offs_dw[None, :],
            mask=row_ok[:, None] & (offs_dw[None, :] < D),
            other=0.0,
        )
        d_cos = tl.trans(d_cos).to(e.dtype)  # rounded to the input dtype, as the reference's autograd does
        if WIDEN:
            acc = tl.dot(d_cos.to(tl.float32), e.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(d_cos, e, acc, input_precision=PRECISION)
    out = grad_w_ptr + offs_c.to(tl.int64)[:, None] * D + offs_dw[None, :]
    tl.store(out, acc, mask=(offs_c[:, None] < C) & (offs_dw[None, :] < D))


@triton.jit
def _grad_rows_kernel(
    rows_ptr,
    weight_ptr,
    target_ptr,
    lse_ptr,
    grad_ptr,
    grad_e_ptr,
    N,
    C,
    D,
    stride_r,
    stride_w,
    scale,
    cols_per_split,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DE: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,
):
    """Partial dE[split, row block, d slice] = sum over the split's classes of dZ W (real rows only)."""
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    split = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_de = pid_d * BLOCK_DE + tl.arange(0, BLOCK_DE)
    row_ok = offs_n < N
    target = tl.load(target_ptr + offs_n, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + offs_n, mask=row_ok, other=0.0)
    grad = tl.load(grad_ptr + offs_n, mask=row_ok, other=0.0)
    c_lo = split * cols_per_split
    c_hi = tl.minimum(c_lo + cols_per_split, C)
    acc = tl.zeros((BLOCK_N, BLOCK_DE), dtype=tl.float32)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        z = _logit_tile(
            rows_ptr, weight_ptr, offs_n, offs_c, N, C, D, stride_r, stride_w, scale,
            BLOCK_N, BLOCK_C, BLOCK_D, PRECISION, WIDEN,
        )  # fmt: skip
        # Every row here is real (N = num_real_rows), so Fig. 2's cut does not apply.
        d_cos = _grad_logit_tile(z, offs_n, offs_c, target, lse, grad, N, c_hi, scale, N, 0)
        w = tl.load(
            weight_ptr + offs_c.to(tl.int64)[:, None] * stride_w + offs_de[None, :],
            mask=(offs_c[:, None] < c_hi) & (offs_de[None, :] < D),
            other=0.0,
        )
        d_cos = d_cos.to(w.dtype)
        if WIDEN:
            acc = tl.dot(d_cos.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(d_cos, w, acc, input_precision=PRECISION)
    out = grad_e_ptr + (split * N + offs_n.to(tl.int64))[:, None] * D + offs_de[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & (offs_de[None, :] < D))


# ---- launchers ----------------------------------------------------------------------------------


def _dot_modes(dtype: torch.dtype, device: torch.device) -> tuple[str, bool]:
    """(PRECISION: input_precision for fp32 operands, WIDEN: widen 16-bit operands to fp32).

    WIDEN exists for Triton 3.9's interpreter, which stores bf16 as uint16 and multiplies those
    integers in tl.dot. 16-bit x 16-bit products are exact in fp32, so the widened dot is the
    tensor-core dot up to summation order; on a GPU WIDEN is False and bf16 goes to tl.dot.
    """
    if dtype == torch.float32:
        # Follow PyTorch's own matmul setting, so fused and reference round alike.
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 and device.type == "cuda" else "ieee"
        return precision, False
    return "tf32", device.type != "cuda"  # input_precision is not used for 16-bit operands


def _class_splits(num_rows_blocks: int, num_classes: int, block_c: int, programs: int, device) -> int:
    """Columns per split (a multiple of block_c) so that row blocks x splits ~ `programs`."""
    if programs <= 0:
        programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    col_blocks = triton.cdiv(num_classes, block_c)
    splits = max(1, min(col_blocks, programs // max(num_rows_blocks, 1)))
    return triton.cdiv(col_blocks, splits) * block_c


def combine_lse(maxes: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """LSE (N,) from (P, N) partial maxima and sums of exp(z - max) over P disjoint class sets."""
    top = maxes.amax(0)
    total = (sums * torch.exp(maxes - top)).sum(0)
    return top + torch.log(total)


def lse_partials(
    rows: torch.Tensor,
    weight: torch.Tensor,
    target_index: torch.Tensor,
    target_logit: torch.Tensor,
    scale: float,
    tuning: MarginSoftmaxTuning,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This shard's (max, sum of exp(z - max)) per row, (N,) each, by the forward kernel."""
    rows, weight = rows.contiguous(), weight.contiguous()  # the kernels assume unit inner strides
    n, d = rows.shape
    c = weight.shape[0]
    if c == 0:  # an empty shard adds nothing to the sum
        return rows.new_full((n,), float("-inf"), dtype=torch.float32), rows.new_zeros(n, dtype=torch.float32)
    precision, widen = _dot_modes(rows.dtype, rows.device)
    grid_n = triton.cdiv(n, tuning.block_n)
    cols_per_split = _class_splits(grid_n, c, tuning.block_c, tuning.programs, rows.device)
    splits = triton.cdiv(c, cols_per_split)
    maxes = torch.empty(splits, n, device=rows.device, dtype=torch.float32)
    sums = torch.empty(splits, n, device=rows.device, dtype=torch.float32)
    _lse_forward_kernel[(grid_n, splits)](
        rows, weight, target_index, target_logit, maxes, sums,
        n, c, d, rows.stride(0), weight.stride(0), float(scale), cols_per_split,
        BLOCK_N=tuning.block_n, BLOCK_C=tuning.block_c, BLOCK_D=tuning.block_d,
        PRECISION=precision, WIDEN=widen, num_warps=tuning.num_warps,
    )  # fmt: skip
    if splits == 1:
        return maxes[0], sums[0]
    top = maxes.amax(0)
    return top, (sums * torch.exp(maxes - top)).sum(0)


def lse_backward(
    rows: torch.Tensor,
    weight: torch.Tensor,
    target_index: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor,
    scale: float,
    num_real_rows: int,
    first_virtual_col: int,
    tuning: MarginSoftmaxTuning,
    *,
    need_rows: bool = True,
    need_weight: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """fp32 gradients of sum_i g_i LSE_i for this shard, off the target column: (N, D), (C, D)."""
    rows, weight = rows.contiguous(), weight.contiguous()  # the kernels assume unit inner strides
    n, d = rows.shape
    c = weight.shape[0]
    precision, widen = _dot_modes(rows.dtype, rows.device)
    grad_rows = grad_weight = None
    if need_weight:
        grad_weight = torch.zeros(c, d, device=rows.device, dtype=torch.float32)
        if c > 0:
            grid = (triton.cdiv(c, tuning.block_c_grad_w), triton.cdiv(d, tuning.block_d_grad_w))
            _grad_weight_kernel[grid](
                rows, weight, target_index, lse, grad_lse, grad_weight,
                n, c, d, rows.stride(0), weight.stride(0), float(scale), num_real_rows, first_virtual_col,
                BLOCK_N=tuning.block_n, BLOCK_C=tuning.block_c_grad_w, BLOCK_D=tuning.block_d,
                BLOCK_DW=tuning.block_d_grad_w, PRECISION=precision, WIDEN=widen, num_warps=tuning.num_warps,
            )  # fmt: skip
    if need_rows:
        grad_rows = torch.zeros(n, d, device=rows.device, dtype=torch.float32)
        if c > 0 and num_real_rows > 0:
            grid_n = triton.cdiv(num_real_rows, tuning.block_n)
            grid_d = triton.cdiv(d, tuning.block_d_grad_e)
            cols_per_split = _class_splits(grid_n * grid_d, c, tuning.block_c, tuning.programs, rows.device)
            splits = triton.cdiv(c, cols_per_split)
            # Partial sums per class split, added here: deterministic, unlike atomics; splits x R x D fp32.
            parts = torch.empty(splits, num_real_rows, d, device=rows.device, dtype=torch.float32)
            _grad_rows_kernel[(grid_n, grid_d, splits)](
                rows, weight, target_index, lse, grad_lse, parts,
                num_real_rows, c, d, rows.stride(0), weight.stride(0), float(scale), cols_per_split,
                BLOCK_N=tuning.block_n, BLOCK_C=tuning.block_c, BLOCK_D=tuning.block_d,
                BLOCK_DE=tuning.block_d_grad_e, PRECISION=precision, WIDEN=widen, num_warps=tuning.num_warps,
            )  # fmt: skip
            grad_rows[:num_real_rows] = parts.sum(0)
    return grad_rows, grad_weight


# ---- autograd -----------------------------------------------------------------------------------


def _all_reduce(x: torch.Tensor, op) -> torch.Tensor:
    if world()[1] > 1:
        dist.all_reduce(x, op=op)
    return x


class _MarginCrossEntropy(torch.autograd.Function):
    """Per-row loss LSE_i - t_i over all ranks' classes; kernels for the N x C part."""

    @staticmethod
    def forward(ctx, rows, weight, target_index, scale, margin, num_real_rows, first_virtual_col, tuning):
        n = rows.shape[0]
        owned = target_index >= 0
        col = target_index.clamp_min(0)  # rows owned by another rank get a placeholder, masked below
        cos_t = (rows.float() * weight[col].float()).sum(1) if weight.shape[0] else rows.new_zeros(n).float()
        target_logit = (scale * margin(cos_t)).float()
        row_max, row_sum = lse_partials(rows, weight, target_index, target_logit, scale, tuning)
        top = _all_reduce(row_max.clone(), dist.ReduceOp.MAX)
        lse = top + torch.log(_all_reduce(row_sum * torch.exp(row_max - top), dist.ReduceOp.SUM))
        # Only the owning rank holds t_i; the sum over ranks gives every rank the same loss.
        target_total = _all_reduce(torch.where(owned, target_logit, 0.0), dist.ReduceOp.SUM)
        ctx.save_for_backward(rows, weight, target_index, cos_t, target_logit, lse)
        ctx.config = (scale, margin, num_real_rows, first_virtual_col, tuning)
        return lse - target_total

    @staticmethod
    def backward(ctx, grad_loss):
        rows, weight, target_index, cos_t, target_logit, lse = ctx.saved_tensors
        scale, margin, num_real_rows, first_virtual_col, tuning = ctx.config
        need_rows, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_loss = grad_loss.float().contiguous()
        grad_rows, grad_weight = lse_backward(
            rows, weight, target_index, lse, grad_loss, scale, num_real_rows, first_virtual_col, tuning,
            need_rows=need_rows, need_weight=need_weight,
        )  # fmt: skip
        # The target column, in fp32 beside the kernels' sums so a 16-bit gradient is rounded once:
        # d loss_i / d cos_iy = g_i (p_iy - 1) * s * margin'(cos_iy), on the rank that owns y_i.
        n = rows.shape[0]
        owned = target_index >= 0
        with torch.enable_grad():
            c = cos_t.detach().requires_grad_()
            (slope,) = torch.autograd.grad(margin(c).sum(), c)
        p_target = torch.exp(target_logit - lse)
        d_cos_t = torch.where(owned, grad_loss * (p_target - 1.0) * scale * slope, 0.0)  # (N,)
        col = target_index.clamp_min(0)
        is_real = torch.arange(n, device=rows.device) < num_real_rows
        if need_rows and weight.shape[0] > 0:
            d_rows = torch.where(is_real, d_cos_t, 0.0)  # virtual rows are constants
            grad_rows += d_rows[:, None] * weight[col].float()
        if need_weight and weight.shape[0] > 0:
            trains = is_real | (col >= first_virtual_col)  # Fig. 2: virtual rows reach W_V only
            d_weight = torch.where(trains, d_cos_t, 0.0)[:, None] * rows.float()
            grad_weight.index_add_(0, col, d_weight)
        grad_rows = grad_rows.to(rows.dtype) if need_rows else None
        grad_weight = grad_weight.to(weight.dtype) if need_weight else None
        return grad_rows, grad_weight, None, None, None, None, None, None


def _check_inputs(rows, weight, target_index, scale, num_real_rows, first_virtual_col):
    if rows.ndim != 2 or weight.ndim != 2:
        raise VigfaceError(
            f"margin_cross_entropy: rows and weight must be 2-D, "
            f"got {tuple(rows.shape)} and {tuple(weight.shape)}"
        )
    n, d = rows.shape
    if weight.shape[1] != d:
        raise VigfaceError(f"margin_cross_entropy: weight has width {weight.shape[1]}, rows have {d}")
    if rows.dtype != weight.dtype or rows.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise VigfaceError(
            f"margin_cross_entropy: rows and weight must share one of float32/bfloat16/float16, "
            f"got {rows.dtype} and {weight.dtype}"
        )
    if target_index.shape != (n,) or target_index.dtype not in (torch.int64, torch.int32):
        raise VigfaceError(
            f"margin_cross_entropy: target_index must be an integer tensor of shape ({n},), "
            f"got {target_index.dtype} {tuple(target_index.shape)}"
        )
    devices = {t.device for t in (rows, weight, target_index)}
    if len(devices) != 1:
        raise VigfaceError(f"margin_cross_entropy: inputs are on several devices {sorted(map(str, devices))}")
    if not scale > 0:
        raise VigfaceError(f"margin_cross_entropy: scale must be positive, got {scale}")
    if not 0 <= num_real_rows <= n:
        raise VigfaceError(f"margin_cross_entropy: num_real_rows must be in [0, {n}], got {num_real_rows}")
    if first_virtual_col < 0:
        raise VigfaceError(f"margin_cross_entropy: first_virtual_col must be >= 0, got {first_virtual_col}")


def margin_cross_entropy(
    rows: torch.Tensor,
    weight: torch.Tensor,
    target_index: torch.Tensor,
    scale: float,
    margin: MarginFn = plain_margin,
    *,
    num_real_rows: int | None = None,
    first_virtual_col: int = 0,
    impl: str = "fused",
    tuning: MarginSoftmaxTuning | None = None,
) -> torch.Tensor:
    """Per-row margin-softmax cross-entropy (N,) fp32; a collective over ranks when W > 1.

    rows (N, D): unit embeddings, real rows first; weight (C, D): this rank's unit prototypes;
    target_index (N,): the target's column in this shard, -1 where another rank owns it;
    margin: target cosines -> margin cosines, elementwise (e.g. `MarginHead.target_cosine`);
    rows [num_real_rows, N) are virtual: constants that train only columns >= first_virtual_col.
    """
    num_real_rows = rows.shape[0] if num_real_rows is None else num_real_rows
    _check_inputs(rows, weight, target_index, scale, num_real_rows, first_virtual_col)
    if impl == "reference":
        return margin_cross_entropy_ref(
            rows, weight, target_index, scale, margin,
            num_real_rows=num_real_rows, first_virtual_col=first_virtual_col,
        )  # fmt: skip
    if impl != "fused":
        raise VigfaceError(f"margin_cross_entropy: impl {impl!r} is unknown; choose {' or '.join(IMPLS)}")
    why = fused_unavailable_reason(rows.device)
    if why is not None:
        raise BackendUnavailableError(why)
    if rows.shape[0] == 0:
        return rows.new_zeros(0, dtype=torch.float32)
    return _MarginCrossEntropy.apply(
        rows.contiguous(), weight.contiguous(), target_index.contiguous(), float(scale), margin,
        num_real_rows, first_virtual_col, tuning or default_tuning(rows.device, rows.dtype),
    )  # fmt: skip
