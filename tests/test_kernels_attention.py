"""Triton flash attention against the plain formula: output, LSE and gradients on odd shapes.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
the same source compiles for the GPU, where these tests run on CUDA tensors with autotuned tiles.

Tolerances (max |error| against an fp32 reference computed from the same rounded inputs;
outputs and gradients here are O(1)):
    dtype   absolute cap   and at most 2x eager PyTorch's own error in that dtype, plus
    fp32    1e-4           2e-5   (IEEE fp32 dots: only the summation order differs)
    fp16    4e-3           5e-4   (fp16 operands, fp32 accumulation)
    bf16    3e-2           4e-3   (bf16 operands, fp32 accumulation; P and dS rounded to bf16)
Measured in the interpreter the kernel's error is 0.4-1.1x eager's in fp16/bf16.

The interpreter multiplies the raw uint16 bit patterns of bfloat16 operands in `tl.dot`
(triton-lang/triton#11584, closed as unsupported): `_interpreter_bf16_dot` makes it convert them
to fp32 first, which is what tensor cores compute (exact products, fp32 sums). Only the
interpreter's NumPy is patched, never the kernels.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
from vigface.kernels.flash_attention import (
    INTERPRET,
    flash_attention,
    flash_attention_forward,
    flash_attention_op,
    flash_attention_ref,
)

from vigface.diffusion.attention import attention
from vigface.errors import BackendUnavailableError, VigfaceError

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ABS_CAP = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
EAGER_FLOOR = {torch.float32: 2e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}


@pytest.fixture(scope="module", autouse=True)
def _interpreter_bf16_dot():
    if not INTERPRET:
        yield
        return
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        as_fp32 = (handle.data.astype(np.uint32) << 16).view(np.float32)  # bf16 = the top half of fp32
        return interpreter.TensorHandle(as_fp32, tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot
    yield
    interpreter.InterpreterBuilder.create_dot = original


def _qkv(batch, heads, seq, head_dim, dtype, seed, packed=False):
    """q, k, v leaves; packed=True makes them strided views of one (N, L, 3, H, D) tensor as in the
    denoiser, so the kernel's stride handling is exercised."""
    g = torch.Generator().manual_seed(seed)
    if packed:
        qkv = torch.randn(batch, seq, 3, heads, head_dim, generator=g).to(DEVICE, dtype)
        qkv.requires_grad_()
        return qkv, qkv.permute(2, 0, 3, 1, 4).unbind(0)
    tensors = [torch.randn(batch, heads, seq, head_dim, generator=g).to(DEVICE, dtype) for _ in range(3)]
    return None, [t.requires_grad_() for t in tensors]


def _compare(q, k, v, dtype, tiles=None, seed=0):
    """Runs kernel, fp32 reference and same-dtype eager reference; checks output and dq, dk, dv."""
    out = flash_attention(q, k, v, tiles=tiles)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    kernel_grads = torch.autograd.grad(out, (q, k, v), grad)

    exact = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = flash_attention_ref(*exact)
    ref_grads = torch.autograd.grad(ref, exact, grad.float())
    eager_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    eager = flash_attention_ref(*eager_in)
    eager_grads = torch.autograd.grad(eager, eager_in, grad)

    for name, got, want, same_dtype in zip(
        ("out", "dq", "dk", "dv"), (out, *kernel_grads), (ref, *ref_grads), (eager, *eager_grads), strict=True
    ):
        assert got.dtype == dtype and got.shape == want.shape, name
        err = (got.float() - want).abs().max().item()
        eager_err = (same_dtype.float() - want).abs().max().item()
        assert err <= ABS_CAP[dtype], f"{name}: max error {err:.2e} over the {dtype} cap {ABS_CAP[dtype]}"
        assert err <= 2 * eager_err + EAGER_FLOOR[dtype], (
            f"{name}: {err:.2e} vs eager {dtype} {eager_err:.2e}"
        )


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The default run keeps the interpreter to ~35 s of CPU: every head dim and dtype at one token,
# bf16 over 4 ragged tiles at 200 tokens, and 784 / 785 tokens in fp32 (tight tolerance) and fp16;
# the full 784 / 785 grid (head dim 128 alone costs a minute in the interpreter) is marked slow.
LONG_FAST = {(785, 64, torch.float32), (784, 32, torch.float16)}
LONG_CASES = [
    pytest.param(seq, hd, dt, marks=() if (seq, hd, dt) in LONG_FAST else pytest.mark.slow)
    for seq in (784, 785)
    for hd in (32, 64, 128)
    for dt in DTYPES
]


@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_token(head_dim, dtype):
    # one key: softmax is 1, out = v, dq = dk = 0, dv = dout (batch 2 x 3 heads for the indexing)
    _, (q, k, v) = _qkv(2, 3, 1, head_dim, dtype, seed=head_dim)
    _compare(q, k, v, dtype)
    assert torch.equal(flash_attention(q, k, v), v)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_200_tokens_bf16(head_dim):
    _, (q, k, v) = _qkv(1, 1, 200, head_dim, torch.bfloat16, seed=head_dim)
    _compare(q, k, v, torch.bfloat16, seed=head_dim)


@pytest.mark.parametrize("seq,head_dim,dtype", LONG_CASES, ids=str)
def test_784_and_785_tokens(seq, head_dim, dtype):
    _, (q, k, v) = _qkv(1, 1, seq, head_dim, dtype, seed=seq + head_dim)
    _compare(q, k, v, dtype, seed=seq)


@pytest.mark.parametrize(
    "tiles,dtype", [((32, 64), torch.float32), ((64, 32), torch.float16), ((16, 128), torch.float32)], ids=str
)
def test_other_tiles_on_packed_qkv(tiles, dtype):
    # rectangular tiles (the autotuner's other configs) on the denoiser's strided q, k, v views
    qkv, (q, k, v) = _qkv(2, 3, 90, 32, dtype, seed=7, packed=True)
    assert not q.is_contiguous()
    _compare(q, k, v, dtype, tiles=tiles)


def test_lse_and_a_custom_scale():
    _, (q, k, v) = _qkv(2, 2, 130, 64, torch.float32, seed=3)
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = flash_attention_forward(q, k, v, 0.3)
    scores = (q @ k.transpose(-1, -2)) * 0.3
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=2e-5, rtol=0)
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ v, atol=2e-5, rtol=0)
    torch.testing.assert_close(flash_attention(q, k, v, scale=0.3), out, atol=0, rtol=0)


def test_output_is_stored_token_major():
    # (N, H, L, D) stored as (N, L, H, D): the denoiser's transpose(1, 2).reshape after it is free
    _, (q, k, v) = _qkv(2, 3, 5, 16, torch.float32, seed=1)
    assert flash_attention(q, k, v).transpose(1, 2).is_contiguous()


def test_custom_op_registration_passes_torch_opcheck():
    # fake (meta) implementation, schema and autograd registration checked by torch itself, incl.
    # the AOT-autograd tracing that torch.compile does
    _, (q, k, v) = _qkv(2, 2, 40, 16, torch.float32, seed=4, packed=True)
    torch.library.opcheck(flash_attention_op, (q, k, v, 0.25))


def test_under_torch_compile_the_kernel_is_the_custom_op_and_differentiable():
    # Inductor cannot trace the autotuner: fullgraph capture only works through the custom op.
    # Forward and gradients of the compiled function against the fp32 formula.
    _, (q, k, v) = _qkv(2, 3, 50, 32, torch.float32, seed=6, packed=True)
    compiled = torch.compile(lambda q, k, v: flash_attention(q, k, v).square().sum(), backend="aot_eager",
                             fullgraph=True)  # fmt: skip
    grads = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    exact = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref_loss = flash_attention_ref(*exact).square().sum()
    ref_grads = torch.autograd.grad(ref_loss, exact)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_dispatcher_backends():
    _, (q, k, v) = _qkv(2, 2, 70, 32, torch.float32, seed=5)
    sdpa = attention(q, k, v, "sdpa")
    torch.testing.assert_close(attention(q, k, v, "triton"), sdpa, atol=2e-5, rtol=0)
    if DEVICE.type == "cpu":
        assert torch.equal(attention(q, k, v, "auto"), sdpa)  # auto = sdpa off CUDA
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(BackendUnavailableError, match="flash-attn-4"):
            attention(q, k, v, "flash")
    with pytest.raises(BackendUnavailableError, match="'xformers' is unknown"):
        attention(q, k, v, "xformers")


def test_bad_inputs_are_clear_errors():
    q = torch.randn(1, 2, 8, 32, device=DEVICE)
    with pytest.raises(VigfaceError, match="head_dim 24"):
        flash_attention(*(torch.randn(1, 2, 8, 24, device=DEVICE) for _ in range(3)))
    with pytest.raises(VigfaceError, match="one shape"):
        flash_attention(q, q, q[:, :, :4])
    with pytest.raises(VigfaceError, match="one dtype"):
        flash_attention(q, q, q.double())
    with pytest.raises(VigfaceError, match=r"\(N, heads, tokens, head_dim\)"):
        flash_attention(q[0], q[0], q[0])
    with pytest.raises(VigfaceError, match="tiles"):
        flash_attention(q, q, q, tiles=(48, 64))
    with pytest.raises(VigfaceError, match="empty"):
        flash_attention(*(torch.randn(1, 2, 0, 32, device=DEVICE) for _ in range(3)))


def test_reference_is_the_textbook_formula():
    # the oracle itself, against an independent float64 computation
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, 9, 16, generator=g, dtype=torch.float64) for _ in range(3))
    weights = np.exp(np.einsum("bhid,bhjd->bhij", q.numpy(), k.numpy()) / math.sqrt(16))
    expected = np.einsum("bhij,bhjd->bhid", weights / weights.sum(-1, keepdims=True), v.numpy())
    np.testing.assert_allclose(flash_attention_ref(q, k, v).numpy(), expected, atol=1e-12)
