"""Fused AdaLN in Triton: LayerNorm + per-sample modulation, optionally after a gated residual.

    adaln_modulate:        h = LN(x) * (1 + scale) + shift                   x, y (N, L, D)
    gated_residual_adaln:  x' = x + gate * y;  h = LN(x') * (1 + scale) + shift  -> (x', h)
                                                                gate, shift, scale (N, D)

The LayerNorm has no affine weights (the denoiser's AdaLN-Zero blocks, eps 1e-6); statistics
are fp32 whatever the storage dtype. In a block, the attention branch's residual `x + g1 * attn`
and the MLP branch's `LN(x) (1 + s2) + b2` become one pass over memory: read x and y, write x'
and h, instead of the three element-wise passes and a LayerNorm of the eager code. Every op is
memory-bound (~1 FLOP per byte), so bytes moved are the whole cost.

Layout: programs are (sample n, chunk of rows of that sample), so the sample's shift / scale /
gate vectors are loaded once per program; a chunk is walked in tiles of BLOCK_ROWS x BLOCK_D
(BLOCK_D = the next power of 2 >= D, masked, so 384, 768, 1152 or 123 all work). The backward
writes the per-sample sums dshift = sum_l dh, dscale = sum_l dh * xhat (and dgate = sum_l dx' * y)
as one fp32 row per program; torch sums the few chunks of each sample.

Backward of h = xhat * (1 + scale) + shift, xhat = (x - mean) * rstd, g = dh * (1 + scale):
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
and for the gated form dx' (from h, plus the gradient arriving at x' itself) flows to
dx = dx', dy = gate * dx', dgate = sum_l dx' * y.

`adaln_modulate_ref` / `gated_residual_adaln_ref` are the plain PyTorch forms (test oracle,
benchmark baseline); they compute in the inputs' dtype like the eager denoiser.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from vigface.errors import BackendUnavailableError, VigfaceError

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------------
# Launch shapes (the only tuning knobs)
# ---------------------------------------------------------------------------------------------


def _launch_shape(width: int, seq: int, samples: int) -> tuple[int, int, int, int]:
    """(BLOCK_D, BLOCK_ROWS, rows per program, warps).

    A tile of ~8K elements (8 rows of 1024 for D = 768) keeps 4-8 warps busy with 16-byte
    loads. Each program walks a chunk of a sample's rows so the backward's per-sample partial
    sums stay small: at least 8 chunks per sample and ~512 programs in all (about 4 per SM on an
    H100); the 784-token, batch-64 case gets 64 x 8 = 512 programs of 13 tiles each.
    """
    block_d = triton.next_power_of_2(width)
    block_rows = max(1, min(16, 8192 // block_d))
    tiles = triton.cdiv(seq, block_rows)
    if INTERPRET:  # programs run serially in NumPy: few of them, still > 1 chunk and > 1 tile per chunk
        chunks = min(tiles, 2)
    else:
        chunks = min(tiles, max(8, triton.cdiv(512, samples)))
    rows_per_program = triton.cdiv(tiles, chunks) * block_rows
    warps = 8 if block_d * block_rows >= 8192 else 4
    return block_d, block_rows, rows_per_program, warps


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _adaln_fwd_kernel(
    X, Y, GATE, SHIFT, SCALE, XOUT, H, MEAN, RSTD,
    stride_gate, stride_shift, stride_scale, seq, width, eps, rows_per_program,
    HAS_GATE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    n, chunk = tl.program_id(0), tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < width
    shift = tl.load(SHIFT + n * stride_shift + cols, mask=col_ok, other=0.0).to(tl.float32)
    scale1 = 1.0 + tl.load(SCALE + n * stride_scale + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_GATE:
        gate = tl.load(GATE + n * stride_gate + cols, mask=col_ok, other=0.0).to(tl.float32)
    first = chunk * rows_per_program
    for start in range(first, first + rows_per_program, BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < seq
        mask = row_ok[:, None] & col_ok[None, :]
        token = n.to(tl.int64) * seq + rows  # int64: N * L * D passes 2**31 at large batches
        offs = token[:, None] * width + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
            x_new = (x + gate[None, :] * y).to(XOUT.dtype.element_ty)
            tl.store(XOUT + offs, x_new, mask=mask)
            x = x_new.to(tl.float32)  # normalise exactly the residual that was stored
        mean = tl.sum(x, 1) / width
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / width + eps)
        h = xc * rstd[:, None] * scale1[None, :] + shift[None, :]
        tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)
        tl.store(MEAN + token, mean, mask=row_ok)
        tl.store(RSTD + token, rstd, mask=row_ok)


@triton.jit
def _adaln_bwd_kernel(
    XN, DH, DXN, Y, GATE, SCALE, MEAN, RSTD, DX, DY, DSHIFT, DSCALE, DGATE,
    stride_gate, stride_scale, seq, width, rows_per_program, chunks,
    HAS_GATE: tl.constexpr, HAS_DXN: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """XN is what was normalised (x, or the stored x' of the gated form); DXN the gradient that
    reaches x' directly (the residual stream), added to the one through h."""
    n, chunk = tl.program_id(0), tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < width
    scale1 = 1.0 + tl.load(SCALE + n * stride_scale + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_GATE:
        gate = tl.load(GATE + n * stride_gate + cols, mask=col_ok, other=0.0).to(tl.float32)
    dshift = tl.zeros([BLOCK_D], tl.float32)
    dscale = tl.zeros([BLOCK_D], tl.float32)
    dgate = tl.zeros([BLOCK_D], tl.float32)
    first = chunk * rows_per_program
    for start in range(first, first + rows_per_program, BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < seq
        mask = row_ok[:, None] & col_ok[None, :]
        token = n.to(tl.int64) * seq + rows
        offs = token[:, None] * width + cols[None, :]
        mean = tl.load(MEAN + token, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + token, mask=row_ok, other=0.0)
        xn = tl.load(XN + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (xn - mean[:, None]) * rstd[:, None], 0.0)
        dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
        dshift += tl.sum(dh, 0)
        dscale += tl.sum(dh * xhat, 0)
        g = dh * scale1[None, :]
        mean_g = tl.sum(g, 1) / width
        mean_gx = tl.sum(g * xhat, 1) / width
        dxn = (g - mean_g[:, None] - xhat * mean_gx[:, None]) * rstd[:, None]
        if HAS_DXN:
            dxn += tl.load(DXN + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, dxn.to(DX.dtype.element_ty), mask=mask)
        if HAS_GATE:
            y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DY + offs, (dxn * gate[None, :]).to(DY.dtype.element_ty), mask=mask)
            dgate += tl.sum(dxn * y, 0)
    part = (n * chunks + chunk) * width + cols
    tl.store(DSHIFT + part, dshift, mask=col_ok)
    tl.store(DSCALE + part, dscale, mask=col_ok)
    if HAS_GATE:
        tl.store(DGATE + part, dgate, mask=col_ok)


# ---------------------------------------------------------------------------------------------
# Launchers and autograd
# ---------------------------------------------------------------------------------------------


def _forward(x, y, gate, shift, scale, eps: float):
    """(x' or None, h, mean, rstd); y and gate are None for the plain modulate."""
    samples, seq, width = x.shape
    block_d, block_rows, rows_per_program, warps = _launch_shape(width, seq, samples)
    grid = (samples, triton.cdiv(seq, rows_per_program))
    has_gate = y is not None
    x_new = None
    normed_dtype = x.dtype
    if has_gate:  # output dtypes follow torch's promotion, as the eager formula's would
        normed_dtype = torch.promote_types(torch.promote_types(x.dtype, gate.dtype), y.dtype)
        x_new = torch.empty(x.shape, dtype=normed_dtype, device=x.device)
    h_dtype = torch.promote_types(torch.promote_types(normed_dtype, shift.dtype), scale.dtype)
    h = torch.empty(x.shape, dtype=h_dtype, device=x.device)
    mean = torch.empty(samples, seq, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    # Without a gate, y / gate / x' are never read or written: other tensors stand in for the pointers.
    _adaln_fwd_kernel[grid](
        x, y if has_gate else x, gate if has_gate else shift, shift, scale, x_new if has_gate else h, h,
        mean, rstd, gate.stride(0) if has_gate else 0, shift.stride(0), scale.stride(0), seq, width, eps,
        rows_per_program, HAS_GATE=has_gate, BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    return x_new, h, mean, rstd


def _backward(xn, dh, dxn, y, gate, scale, mean, rstd, x_dtype):
    """(dx, dy, dgate, dshift, dscale); dy and dgate are None without a gate."""
    samples, seq, width = xn.shape
    block_d, block_rows, rows_per_program, warps = _launch_shape(width, seq, samples)
    chunks = triton.cdiv(seq, rows_per_program)
    has_gate, has_dxn = y is not None, dxn is not None
    dh = dh.contiguous()
    dxn = dxn.contiguous() if has_dxn else None
    dx = torch.empty(xn.shape, dtype=x_dtype, device=xn.device)
    dy = torch.empty_like(y) if has_gate else None
    partial = torch.empty(3 if has_gate else 2, samples, chunks, width, dtype=torch.float32, device=xn.device)
    _adaln_bwd_kernel[(samples, chunks)](
        xn, dh, dxn if has_dxn else dh, y if has_gate else xn, gate if has_gate else scale, scale, mean, rstd,
        dx, dy if has_gate else dx, partial[0], partial[1], partial[2] if has_gate else partial[1],
        gate.stride(0) if has_gate else 0, scale.stride(0), seq, width, rows_per_program, chunks,
        HAS_GATE=has_gate, HAS_DXN=has_dxn, BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    sums = partial.sum(2)  # (2 or 3, N, D): the few chunks of each sample
    dgate = sums[2] if has_gate else None
    return dx, dy, dgate, sums[0], sums[1]


class AdaLNModulateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        _, h, mean, rstd = _forward(x, None, None, shift, scale, eps)
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.shift_dtype = shift.dtype
        return h

    @staticmethod
    def backward(ctx, dh):
        x, scale, mean, rstd = ctx.saved_tensors
        dx, _, _, dshift, dscale = _backward(x, dh, None, None, None, scale, mean, rstd, x.dtype)
        return dx, dshift.to(ctx.shift_dtype), dscale.to(scale.dtype), None


class GatedResidualAdaLNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, gate, shift, scale, eps):
        x_new, h, mean, rstd = _forward(x, y, gate, shift, scale, eps)
        ctx.save_for_backward(x_new, y, gate, scale, mean, rstd)
        ctx.x_dtype, ctx.shift_dtype = x.dtype, shift.dtype
        return x_new, h

    @staticmethod
    def backward(ctx, dx_new, dh):
        x_new, y, gate, scale, mean, rstd = ctx.saved_tensors
        dx, dy, dgate, dshift, dscale = _backward(x_new, dh, dx_new, y, gate, scale, mean, rstd, ctx.x_dtype)
        return dx, dy, dgate.to(gate.dtype), dshift.to(ctx.shift_dtype), dscale.to(scale.dtype), None


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def _check(x: torch.Tensor, vectors: dict[str, torch.Tensor], y: torch.Tensor | None = None) -> None:
    if x.dim() != 3:
        raise VigfaceError(f"adaln: x must be (N, tokens, width), got shape {tuple(x.shape)}")
    if y is not None and y.shape != x.shape:
        raise VigfaceError(f"adaln: y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    for name, t in vectors.items():
        if t.shape != (x.shape[0], x.shape[2]):
            raise VigfaceError(
                f"adaln: {name} must be (N, width) = {(x.shape[0], x.shape[2])}, got {tuple(t.shape)}"
            )
    tensors = {"x": x, **vectors, **({"y": y} if y is not None else {})}
    for name, t in tensors.items():
        if t.dtype not in DTYPES:
            raise VigfaceError(f"adaln: {name} must be float16/bfloat16/float32, got {t.dtype}")
        if t.device != x.device:
            raise VigfaceError(f"adaln: {name} is on {t.device}, x on {x.device}")
    if x.device.type != "cuda" and not INTERPRET:
        raise BackendUnavailableError(
            f"the Triton AdaLN kernel needs CUDA tensors, got {x.device.type} "
            "(or set TRITON_INTERPRET=1 before importing vigface.kernels, for the slow interpreter)"
        )


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(N, D) vectors may be column chunks of the AdaLN projection (row stride 6 D): only the last
    dimension must be contiguous."""
    return t if t.stride(-1) == 1 else t.contiguous()


def adaln_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale) + shift, per sample; differentiable in x, shift and scale."""
    _check(x, {"shift": shift, "scale": scale})
    return AdaLNModulateFunction.apply(x.contiguous(), _rows(shift), _rows(scale), float(eps))


def gated_residual_adaln(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x' = x + gate * y, LayerNorm(x') * (1 + scale) + shift); differentiable in all five."""
    _check(x, {"gate": gate, "shift": shift, "scale": scale}, y)
    return GatedResidualAdaLNFunction.apply(
        x.contiguous(), y.contiguous(), _rows(gate), _rows(shift), _rows(scale), float(eps)
    )


def adaln_modulate_ref(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale[:, None]) + shift[:, None]


def gated_residual_adaln_ref(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x + gate[:, None] * y
    return x, adaln_modulate_ref(x, shift, scale, eps)
