"""Flash attention in Triton: softmax(q k^T * scale) v without the L x L matrix, forward and backward.

    q, k, v (N, H, L, D) -> out (N, H, L, D)                       non-causal self-attention

Forward (FlashAttention-2): one program per (64- or 128-row query tile, batch x head). It walks
the keys in tiles of BLOCK_N with an online softmax: a running row max m and row sum l, the
accumulator rescaled by exp(m_old - m_new) whenever the max grows. It writes the output and the
row log-sum-exp LSE = m + log(l) (fp32, natural log), which is all the backward needs.

Backward (recompute): a preprocessing kernel makes delta = rowsum(dO * O); then one kernel per
key tile accumulates dK, dV over all query tiles and one kernel per query tile accumulates dQ,
both rebuilding P = exp(q k^T * scale - LSE) tile by tile. Two kernels instead of one with
atomics: no fp32 dQ scratch and the result is deterministic.

Lengths that are not a multiple of the tile (784 = 12 x 64 + 16, 785 with a class token, 1) run
the full tiles unmasked and only the last tile with masks. 784 tokens waste 12.5 % of 128-row
query tiles and 2 % of 64-row tiles, so 64-row tiles are among the autotuned configs.
bf16 / fp16 inputs use fp32 accumulation; fp32 inputs use IEEE fp32 dots (no TF32), so the
fp32 path is an exact-arithmetic check rather than a fast path.

`flash_attention_ref` is the plain PyTorch formula: test oracle and benchmark baseline.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from vigface.errors import BackendUnavailableError, VigfaceError

# Read when the kernels are decorated: `triton.jit` returns interpreter functions under this flag.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Autotuning on the GPU is on by default; VIGFACE_AUTOTUNE=0 pins the first config of each list.
AUTOTUNE = os.environ.get("VIGFACE_AUTOTUNE", "1") != "0"
LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128, 256)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------------
# Tile configurations (the only tuning knobs). The first entry of each list is the pinned one.
# ---------------------------------------------------------------------------------------------


def _configs(tiles: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    if INTERPRET:
        # The interpreter runs every program serially in NumPy: one fixed config, the GPU's pinned
        # 64 x 64 (3x faster there than 32 x 64). Other tiles are tested through `tiles=`.
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]
    return configs if AUTOTUNE else configs[:1]


# (BLOCK_M, BLOCK_N, warps, stages). Forward: BLOCK_M query rows per program, BLOCK_N keys per step.
FWD_TILES = [
    (64, 64, 4, 3),
    (64, 128, 4, 3),
    (128, 64, 8, 3),
    (128, 128, 8, 3),
    (64, 64, 4, 4),
    (128, 64, 4, 4),
]
# Backward dK/dV: BLOCK_N keys per program, BLOCK_M queries per step. dQ: the forward's roles.
BWD_TILES = [
    (64, 64, 4, 2),
    (32, 64, 4, 3),
    (64, 128, 8, 2),
    (128, 64, 8, 2),
    (64, 64, 8, 3),
]


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_tile(
    q, m_i, l_i, acc, k_base, v_base, stride_kl, stride_vl, seq, start_n, qk_scale,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, MASK_N: tl.constexpr,
):  # fmt: skip
    """One step of the online softmax over keys [start_n, start_n + BLOCK_N)."""
    cols = start_n + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    kt_ptrs = k_base + cols[None, :] * stride_kl + dims[:, None]  # (D, BLOCK_N): k transposed
    v_ptrs = v_base + cols[:, None] * stride_vl + dims[None, :]  # (BLOCK_N, D)
    if MASK_N:
        kt = tl.load(kt_ptrs, mask=cols[None, :] < seq, other=0.0)
        v = tl.load(v_ptrs, mask=cols[:, None] < seq, other=0.0)
    else:
        kt = tl.load(kt_ptrs)
        v = tl.load(v_ptrs)
    s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
    if MASK_N:
        s = tl.where(cols[None, :] < seq, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old max
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl, stride_ob, stride_oh, stride_ol,
    heads, seq, qk_scale,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // heads).to(tl.int64), pid_bh % heads  # int64: batch offsets pass 2**31 early
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < seq
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_ql + dims[None, :],
                mask=row_ok[:, None], other=0.0)  # fmt: skip
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full = (seq // BLOCK_N) * BLOCK_N
    for start_n in range(0, full, BLOCK_N):  # whole key tiles: no masks
        m_i, l_i, acc = _fwd_tile(q, m_i, l_i, acc, k_base, v_base, stride_kl, stride_vl, seq, start_n,
                                  qk_scale, BLOCK_N, HEAD_DIM, PRECISION, False)  # fmt: skip
    if full < seq:  # the ragged last key tile
        m_i, l_i, acc = _fwd_tile(q, m_i, l_i, acc, k_base, v_base, stride_kl, stride_vl, seq, full,
                                  qk_scale, BLOCK_N, HEAD_DIM, PRECISION, True)  # fmt: skip

    out = acc / l_i[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_ol + dims[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None])  # fmt: skip
    # m_i and log2(l_i) are in log2 units; LSE is stored as a natural log.
    tl.store(LSE + pid_bh * seq + rows, (m_i + tl.log2(l_i)) / 1.4426950408889634, mask=row_ok)


_fwd = triton.autotune(configs=_configs(FWD_TILES), key=["seq", "HEAD_DIM", "PRECISION"])(_fwd_kernel)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_ol, stride_db, stride_dh, stride_dl,
                      heads, seq, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """delta = rowsum(dO * O): the softmax backward's correction term, one fp32 value per row."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // heads).to(tl.int64), pid_bh % heads  # int64: batch offsets pass 2**31 early
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < seq
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_ol + dims[None, :],
                mask=row_ok[:, None], other=0.0)  # fmt: skip
    do = tl.load(DO + b * stride_db + h * stride_dh + rows[:, None] * stride_dl + dims[None, :],
                 mask=row_ok[:, None], other=0.0)  # fmt: skip
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh * seq + rows, delta, mask=row_ok)


@triton.jit
def _dkdv_tile(
    k, v, dk, dv, q_base, do_base, lse_base, delta_base, stride_ql, stride_dl, seq, start_m, qk_scale,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, MASK_M: tl.constexpr,
):  # fmt: skip
    """Adds the contribution of queries [start_m, start_m + BLOCK_M) to this key tile's dK, dV."""
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    qt_ptrs = q_base + rows[None, :] * stride_ql + dims[:, None]  # (D, BLOCK_M): q transposed
    do_ptrs = do_base + rows[:, None] * stride_dl + dims[None, :]  # (BLOCK_M, D)
    if MASK_M:
        qt = tl.load(qt_ptrs, mask=rows[None, :] < seq, other=0.0)
        do = tl.load(do_ptrs, mask=rows[:, None] < seq, other=0.0)
        # LSE = +inf past the end makes P = exp(s - LSE) = 0 for those rows
        lse = tl.load(lse_base + rows, mask=rows < seq, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=rows < seq, other=0.0)
    else:
        qt = tl.load(qt_ptrs)
        do = tl.load(do_ptrs)
        lse = tl.load(lse_base + rows)
        delta = tl.load(delta_base + rows)
    st = tl.dot(k, qt, input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M), log2 units
    pt = tl.exp2(st - lse[None, :] * 1.4426950408889634)  # P^T, exactly the forward's probabilities
    dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
    dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (dO V^T)^T
    dst = pt * (dpt - delta[None, :])  # dS^T = P^T * (dP^T - delta)
    dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
    stride_db, stride_dh, stride_dl, stride_gkb, stride_gkh, stride_gkl, stride_gvb, stride_gvh, stride_gvl,
    heads, seq, qk_scale, scale,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // heads).to(tl.int64), pid_bh % heads  # int64: batch offsets pass 2**31 early
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    col_ok = cols < seq
    k = tl.load(K + b * stride_kb + h * stride_kh + cols[:, None] * stride_kl + dims[None, :],
                mask=col_ok[:, None], other=0.0)  # fmt: skip
    v = tl.load(V + b * stride_vb + h * stride_vh + cols[:, None] * stride_vl + dims[None, :],
                mask=col_ok[:, None], other=0.0)  # fmt: skip
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_db + h * stride_dh
    lse_base, delta_base = LSE + pid_bh * seq, DELTA + pid_bh * seq

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    full = (seq // BLOCK_M) * BLOCK_M
    for start_m in range(0, full, BLOCK_M):
        dk, dv = _dkdv_tile(k, v, dk, dv, q_base, do_base, lse_base, delta_base, stride_ql, stride_dl, seq,
                            start_m, qk_scale, BLOCK_M, HEAD_DIM, PRECISION, False)  # fmt: skip
    if full < seq:
        dk, dv = _dkdv_tile(k, v, dk, dv, q_base, do_base, lse_base, delta_base, stride_ql, stride_dl, seq,
                            full, qk_scale, BLOCK_M, HEAD_DIM, PRECISION, True)  # fmt: skip

    dk *= scale  # s = scale * q.k, so dK = scale * dS^T Q
    tl.store(DK + b * stride_gkb + h * stride_gkh + cols[:, None] * stride_gkl + dims[None, :],
             dk.to(DK.dtype.element_ty), mask=col_ok[:, None])  # fmt: skip
    tl.store(DV + b * stride_gvb + h * stride_gvh + cols[:, None] * stride_gvl + dims[None, :],
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None])  # fmt: skip


@triton.jit
def _dq_tile(
    q, do, lse2, delta, dq, k_base, v_base, stride_kl, stride_vl, seq, start_n, qk_scale,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, MASK_N: tl.constexpr,
):  # fmt: skip
    """Adds the contribution of keys [start_n, start_n + BLOCK_N) to this query tile's dQ."""
    cols = start_n + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    kt_ptrs = k_base + cols[None, :] * stride_kl + dims[:, None]  # (D, BLOCK_N)
    vt_ptrs = v_base + cols[None, :] * stride_vl + dims[:, None]  # (D, BLOCK_N)
    if MASK_N:
        kt = tl.load(kt_ptrs, mask=cols[None, :] < seq, other=0.0)
        vt = tl.load(vt_ptrs, mask=cols[None, :] < seq, other=0.0)
    else:
        kt = tl.load(kt_ptrs)
        vt = tl.load(vt_ptrs)
    s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
    p = tl.exp2(s - lse2[:, None])
    if MASK_N:
        p = tl.where(cols[None, :] < seq, p, 0.0)
    dp = tl.dot(do, vt, input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
    return dq


@triton.jit
def _dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
    stride_db, stride_dh, stride_dl, stride_gqb, stride_gqh, stride_gql,
    heads, seq, qk_scale, scale,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // heads).to(tl.int64), pid_bh % heads  # int64: batch offsets pass 2**31 early
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < seq
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_ql + dims[None, :],
                mask=row_ok[:, None], other=0.0)  # fmt: skip
    do = tl.load(DO + b * stride_db + h * stride_dh + rows[:, None] * stride_dl + dims[None, :],
                 mask=row_ok[:, None], other=0.0)  # fmt: skip
    lse2 = tl.load(LSE + pid_bh * seq + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + pid_bh * seq + rows, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full = (seq // BLOCK_N) * BLOCK_N
    for start_n in range(0, full, BLOCK_N):
        dq = _dq_tile(q, do, lse2, delta, dq, k_base, v_base, stride_kl, stride_vl, seq, start_n, qk_scale,
                      BLOCK_N, HEAD_DIM, PRECISION, False)  # fmt: skip
    if full < seq:
        dq = _dq_tile(q, do, lse2, delta, dq, k_base, v_base, stride_kl, stride_vl, seq, full, qk_scale,
                      BLOCK_N, HEAD_DIM, PRECISION, True)  # fmt: skip

    dq *= scale
    tl.store(DQ + b * stride_gqb + h * stride_gqh + rows[:, None] * stride_gql + dims[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])  # fmt: skip


_dkdv = triton.autotune(configs=_configs(BWD_TILES), key=["seq", "HEAD_DIM", "PRECISION"])(_dkdv_kernel)
_dq = triton.autotune(configs=_configs(BWD_TILES), key=["seq", "HEAD_DIM", "PRECISION"])(_dq_kernel)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: IEEE dots, so the fp32 path is exact; 16-bit inputs run on tensor cores anyway.
    return "ieee" if dtype == torch.float32 else "tf32"


def _new_bhld(like: torch.Tensor) -> torch.Tensor:
    """An (N, H, L, D) tensor stored as (N, L, H, D): the denoiser's `out.transpose(1, 2)
    .reshape(N, L, H * D)` after attention is then free."""
    n, h, length, d = like.shape
    return torch.empty(n, length, h, d, dtype=like.dtype, device=like.device).transpose(1, 2)


def _launch(autotuned, kernel, grid, args, tiles, **constexprs) -> None:
    """Runs the autotuned kernel, or the plain one with tiles=(BLOCK_M, BLOCK_N) pinned by the caller
    (tests of other tile shapes, benchmarks of one config)."""
    if tiles is None:
        autotuned[grid](*args, **constexprs)
    else:
        meta = {"BLOCK_M": tiles[0], "BLOCK_N": tiles[1]}
        kernel[grid(meta)](*args, **constexprs, **meta, num_warps=4 if max(tiles) <= 64 else 8)


def flash_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, tiles: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (N, H, L, D), lse (N, H, L) fp32 natural-log row log-sum-exp of q k^T * scale)."""
    n, heads, seq, head_dim = q.shape
    out = _new_bhld(q)
    lse = torch.empty(n, heads, seq, dtype=torch.float32, device=q.device)

    def grid(meta):
        return (triton.cdiv(seq, meta["BLOCK_M"]), n * heads)

    args = (
        q,
        k,
        v,
        out,
        lse,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(out),
        heads,
        seq,
        scale * LOG2E,
    )
    _launch(_fwd, _fwd_kernel, grid, args, tiles, HEAD_DIM=head_dim, PRECISION=_precision(q.dtype))
    return out, lse


def flash_attention_backward(q, k, v, out, lse, grad_out, scale: float, tiles: tuple[int, int] | None = None):
    """(dq, dk, dv) from the saved forward tensors; recomputes P tile by tile."""
    n, heads, seq, head_dim = q.shape
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    delta = torch.empty(n, heads, seq, dtype=torch.float32, device=q.device)
    delta_rows = 64
    _bwd_delta_kernel[(triton.cdiv(seq, delta_rows), n * heads)](
        out, grad_out, delta, *_strides(out), *_strides(grad_out), heads, seq,
        HEAD_DIM=head_dim, BLOCK_M=delta_rows,
    )  # fmt: skip
    dq, dk, dv = (torch.empty(n, heads, seq, head_dim, dtype=q.dtype, device=q.device) for _ in range(3))
    constexprs = {"HEAD_DIM": head_dim, "PRECISION": _precision(q.dtype)}

    def key_grid(meta):
        return (triton.cdiv(seq, meta["BLOCK_N"]), n * heads)

    def query_grid(meta):
        return (triton.cdiv(seq, meta["BLOCK_M"]), n * heads)

    inputs = (q, k, v, grad_out, lse, delta)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out))
    sizes = (heads, seq, scale * LOG2E, scale)
    _launch(_dkdv, _dkdv_kernel, key_grid, (*inputs, dk, dv, *strides, *_strides(dk), *_strides(dv), *sizes),
            tiles, **constexprs)  # fmt: skip
    _launch(_dq, _dq_kernel, query_grid, (*inputs, dq, *strides, *_strides(dq), *sizes), tiles, **constexprs)
    return dq, dk, dv


# Under torch.compile the kernel runs as this custom op: opaque to Dynamo and Inductor (which would
# otherwise trace the autotuner's Python), its fake implementation giving the outputs' shapes and
# strides, and differentiable through the same backward as FlashAttentionFunction.
@torch.library.custom_op("vigface::flash_attention", mutates_args=())
def flash_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return flash_attention_forward(q, k, v, scale)


@flash_attention_op.register_fake
def _flash_attention_op_fake(q, k, v, scale):
    n, heads, seq, _ = q.shape
    return _new_bhld(q), q.new_empty(n, heads, seq, dtype=torch.float32)


@torch.library.custom_op("vigface::flash_attention_backward", mutates_args=())
def flash_attention_backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return flash_attention_backward(q, k, v, out, lse, grad_out, scale)


@flash_attention_backward_op.register_fake
def _flash_attention_backward_op_fake(q, k, v, out, lse, grad_out, scale):
    return tuple(torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))


def _flash_attention_op_setup(ctx, inputs, output):
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.scale = scale


def _flash_attention_op_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    return (*flash_attention_backward_op(q, k, v, out, lse, grad_out, ctx.scale), None)


flash_attention_op.register_autograd(_flash_attention_op_backward, setup_context=_flash_attention_op_setup)


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, tiles):
        out, lse = flash_attention_forward(q, k, v, scale, tiles)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.tiles = scale, tiles
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(q, k, v, out, lse, grad_out, ctx.scale, ctx.tiles)
        return dq, dk, dv, None, None


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raises a VigfaceError naming what the Triton kernel cannot take; BackendUnavailableError when
    the device cannot run Triton at all."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise VigfaceError(
                f"flash_attention: {name} must be (N, heads, tokens, head_dim), got {tuple(t.shape)}"
            )
    if not q.shape == k.shape == v.shape:
        raise VigfaceError(
            f"flash_attention: q, k, v must have one shape (self-attention), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not q.dtype == k.dtype == v.dtype or q.dtype not in DTYPES:
        raise VigfaceError(
            f"flash_attention: q, k, v must share one dtype of float16/bfloat16/float32, got "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )
    if q.shape[-1] not in HEAD_DIMS:
        raise VigfaceError(
            f"flash_attention: head_dim {q.shape[-1]} is not supported; the kernel takes "
            f"{', '.join(map(str, HEAD_DIMS))} (use the sdpa backend for others)"
        )
    if q.shape[2] == 0:
        raise VigfaceError("flash_attention: the sequence is empty (0 tokens)")
    if not q.device == k.device == v.device:
        raise VigfaceError(
            f"flash_attention: q, k, v are on different devices ({q.device}, {k.device}, {v.device})"
        )
    if q.device.type != "cuda" and not INTERPRET:
        raise BackendUnavailableError(
            f"the Triton attention kernel needs CUDA tensors, got {q.device.type} "
            "(or set TRITON_INTERPRET=1 before importing vigface.kernels, for the slow interpreter)"
        )


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    tiles: tuple[int, int] | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v for (N, H, L, D) tensors; differentiable. scale defaults to 1/sqrt(D).

    tiles=(BLOCK_M, BLOCK_N) pins one tile shape (powers of 2, at least 16) instead of autotuning."""
    check_inputs(q, k, v)
    if tiles is not None and not all(t >= 16 and t & (t - 1) == 0 for t in tiles):
        raise VigfaceError(f"flash_attention: tiles must be two powers of 2 of at least 16, got {tiles}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if tiles is None and torch.compiler.is_compiling():
        return flash_attention_op(q, k, v, scale)[0]
    return FlashAttentionFunction.apply(q, k, v, scale, tiles)


def flash_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """The textbook formula in the inputs' dtype, holding the whole (L, L) matrix: oracle and baseline."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v
