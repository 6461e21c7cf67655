"""Fused AdaLN kernels against the plain formula, and the whole denoiser with the Triton kernels.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
No bf16 arithmetic happens inside these kernels (everything is widened to fp32 after the load),
so the interpreter's bf16 gaps do not apply.

Tolerances, against an fp32 reference from the same rounded inputs:
    outputs (x', h), elementwise  |err| <= atol + rtol |ref|:
        fp32 atol 1e-5 rtol 1e-5;  fp16 atol 2e-3 rtol 2e-3 (1 ulp);  bf16 atol 1.6e-2 rtol 1.6e-2 (2 ulp)
    gradients, max |err| / max |ref|:  fp32 1e-5;  fp16 4e-3;  bf16 3e-2
    and every error at most 2x that of eager PyTorch in the same dtype, plus the atol above.
Denoiser (tiny preset, fp32, attention="triton", adaln="triton" vs "sdpa" / "reference"):
    output max |err| <= 1e-5 (outputs are O(1)); parameter gradients within 1e-4 of their max.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from vigface.kernels.adaln import (
    adaln_modulate,
    adaln_modulate_ref,
    gated_residual_adaln,
    gated_residual_adaln_ref,
)

from vigface.diffusion.denoiser import Denoiser
from vigface.diffusion.denoiser_config import DenoiserConfig
from vigface.errors import VigfaceError

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, tokens, width): the paper's widths incl. non-powers of 2 (384, 768, 1152) and a small odd one
SHAPES = [(2, 33, 123), (2, 17, 384), (1, 20, 768), (2, 9, 1152)]


def _inputs(shape, dtype, seed):
    """x, y (N, L, D) and gate, shift, scale as column chunks of one (N, 6 D) projection, as the
    denoiser's AdaLN layer makes them (row stride 6 D)."""
    n, length, width = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3 + 1  # a mean and spread for the LayerNorm to remove
    y = torch.randn(shape, generator=g)
    ada = torch.randn(n, 6 * width, generator=g) * 0.5
    tensors = [x, y, *ada.to(DEVICE, dtype).chunk(6, dim=1)[:3]]
    return [t.to(DEVICE, dtype).requires_grad_() for t in tensors]


def _check(got, want, same_dtype, dtype, name, grad=False):
    assert got.dtype == same_dtype.dtype, f"{name}: dtype {got.dtype}, eager gives {same_dtype.dtype}"
    err = (got.float() - want).abs()
    eager_err = (same_dtype.float() - want).abs().max().item()
    atol, rtol = TOL[dtype]
    if grad:
        rel = err.max().item() / max(want.abs().max().item(), 1e-30)
        assert rel <= GRAD_TOL[dtype], f"{name}: relative error {rel:.2e}"
    else:
        worst = (err - rtol * want.abs()).max().item()
        assert worst <= atol, f"{name}: error {worst:.2e} beyond atol {atol} + rtol {rtol} |ref|"
    assert err.max().item() <= 2 * eager_err + atol, (
        f"{name}: {err.max().item():.2e} vs eager {eager_err:.2e}"
    )


def _run(fn, leaves, grads):
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return outs, torch.autograd.grad(outs, leaves, grads[: len(outs)])


def _compare(kernel, reference, leaves, dtype, seed):
    exact = [t.detach().float().requires_grad_() for t in leaves]
    eager_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    ref_outs, ref_grads = _run(reference, exact, _grads(reference, exact, seed))
    eager_outs, eager_grads = _run(
        reference, eager_leaves, [g.to(dtype) for g in _grads(reference, exact, seed)]
    )
    outs, grads = _run(kernel, leaves, [g.to(dtype) for g in _grads(reference, exact, seed)])
    for i, (got, want, same) in enumerate(zip(outs, ref_outs, eager_outs, strict=True)):
        _check(got, want, same, dtype, f"output {i}")
    names = ["x", "y", "gate", "shift", "scale"] if len(leaves) == 5 else ["x", "shift", "scale"]
    for name, got, want, same in zip(names, grads, ref_grads, eager_grads, strict=True):
        _check(got, want, same, dtype, f"d{name}", grad=True)


def _grads(reference, exact, seed):
    with torch.no_grad():
        outs = reference(*exact)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed + 100)
    return [torch.randn(o.shape, generator=g).to(DEVICE) for o in outs]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adaln_modulate(shape, dtype):
    x, _, _, shift, scale = _inputs(shape, dtype, seed=shape[2])
    _compare(adaln_modulate, adaln_modulate_ref, [x, shift, scale], dtype, seed=1)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gated_residual_adaln(shape, dtype):
    leaves = _inputs(shape, dtype, seed=shape[2] + 1)
    _compare(gated_residual_adaln, gated_residual_adaln_ref, leaves, dtype, seed=2)


def test_only_h_used_and_one_token():
    # x' unused downstream (its gradient is zero) and a single token per sample
    x, y, gate, shift, scale = _inputs((3, 1, 200), torch.float32, seed=5)
    _, h = gated_residual_adaln(x, y, gate, shift, scale)
    grads = torch.autograd.grad(h.square().sum(), (x, y, gate, shift, scale))
    exact = [t.detach().requires_grad_() for t in (x, y, gate, shift, scale)]
    _, h_ref = gated_residual_adaln_ref(*exact)
    ref_grads = torch.autograd.grad(h_ref.square().sum(), exact)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_mixed_dtypes_as_under_autocast():
    # bf16 autocast: fp32 residual stream, bf16 branch output and modulation vectors. Outputs take
    # torch's promoted dtypes; the kernel forms gate * y in fp32 (exact for bf16 factors) where eager
    # rounds it to bf16 first, so it is compared with the fp32 formula on the same values.
    x, _, _, _, _ = _inputs((2, 10, 96), torch.float32, seed=6)
    _, y, gate, shift, scale = _inputs((2, 10, 96), torch.bfloat16, seed=6)
    x_new, h = gated_residual_adaln(x, y, gate, shift, scale)
    x_eager, h_eager = gated_residual_adaln_ref(*(t.detach() for t in (x, y, gate, shift, scale)))
    x_ref, h_ref = gated_residual_adaln_ref(*(t.detach().float() for t in (x, y, gate, shift, scale)))
    assert (x_new.dtype, h.dtype) == (x_eager.dtype, h_eager.dtype) == (torch.float32, torch.float32)
    torch.testing.assert_close(x_new, x_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_ref, atol=1e-4, rtol=1e-4)
    grads = torch.autograd.grad((x_new.sum() + h.square().sum()), (x, y, gate, shift, scale))
    assert [g.dtype for g in grads] == [torch.float32] + [torch.bfloat16] * 4


def test_reference_is_layernorm_then_modulate():
    # the oracle itself, against nn.LayerNorm and the denoiser's formula written out
    x, y, gate, shift, scale = (t.detach().double() for t in _inputs((2, 5, 12), torch.float32, seed=8))
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-6) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(adaln_modulate_ref(x, shift, scale), expected)
    x_new, h = gated_residual_adaln_ref(x, y, gate, shift, scale)
    torch.testing.assert_close(x_new, x + gate[:, None] * y)
    torch.testing.assert_close(h, adaln_modulate_ref(x + gate[:, None] * y, shift, scale))


def test_bad_inputs_are_clear_errors():
    x = torch.randn(2, 4, 8, device=DEVICE)
    v = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(VigfaceError, match=r"x must be \(N, tokens, width\)"):
        adaln_modulate(x[0], v, v)
    with pytest.raises(VigfaceError, match="shift must be"):
        adaln_modulate(x, v[:1], v)
    with pytest.raises(VigfaceError, match="y must have"):
        gated_residual_adaln(x, x[:, :2], v, v, v)
    with pytest.raises(VigfaceError, match="float16/bfloat16/float32"):
        adaln_modulate(x.double(), v, v)


# ---------------------------------------------------------------------------------------------
# The whole denoiser: Triton attention + fused AdaLN against the reference model, same weights
# ---------------------------------------------------------------------------------------------


def _denoiser_pair(arch, final_conv=False):
    torch.manual_seed(0)
    reference = Denoiser(DenoiserConfig.preset("tiny", arch=arch, final_conv=final_conv)).to(DEVICE)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # AdaLN-Zero starts as the identity: give the zero layers weights
        for p in reference.parameters():
            if not p.abs().sum():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    fast = Denoiser(
        DenoiserConfig.preset("tiny", arch=arch, attention="triton", adaln="triton", final_conv=final_conv)
    ).to(DEVICE)
    fast.load_state_dict(reference.state_dict())  # same keys: the kernels add no parameters
    return reference, fast


@pytest.mark.parametrize(
    "arch, final_conv", [("uvit", False), ("uvit", True), pytest.param("dit", False, marks=pytest.mark.slow)]
)
def test_denoiser_with_triton_kernels_matches_reference(arch, final_conv):
    reference, fast = _denoiser_pair(arch, final_conv)
    g = torch.Generator().manual_seed(1)
    x, pose = torch.randn(2, 3, 56, 56, generator=g), torch.rand(2, 5, 56, 56, generator=g)
    cond, target = torch.randn(2, 512, generator=g), torch.randn(2, 3, 56, 56, generator=g)
    x, pose, cond, target, t = (v.to(DEVICE) for v in (x, pose, cond, target, torch.tensor([3, 700])))
    outs = []
    for model in (reference, fast):
        out = model(x, t, cond, pose)
        F.mse_loss(out, target).backward()
        outs.append(out.detach())
    assert outs[0].abs().max() > 0.1  # a non-trivial output
    assert (outs[1] - outs[0]).abs().max().item() <= 1e-5
    checked = 0
    for (name, p_ref), p_fast in zip(reference.named_parameters(), fast.parameters(), strict=True):
        scale = p_ref.grad.abs().max().item()
        if scale > 0:
            assert (p_fast.grad - p_ref.grad).abs().max().item() <= 1e-4 * scale, name
            checked += 1
    assert checked == len(list(reference.parameters()))


def test_adaln_config_is_validated_and_old_configs_load():
    cfg = DenoiserConfig.preset("tiny", adaln="auto", attention="auto")
    assert cfg.to_dict()["adaln"] == "auto"
    old = DenoiserConfig.preset("tiny").to_dict()
    del old["adaln"]  # a denoiser.json written before the field existed
    assert DenoiserConfig(**json.loads(json.dumps(old))).adaln == "reference"
    with pytest.raises(VigfaceError, match="adaln 'fused' is unknown"):
        DenoiserConfig(adaln="fused")
    with pytest.raises(VigfaceError, match="attention 'xformers' is unknown"):
        DenoiserConfig(attention="xformers")


def test_auto_is_the_reference_on_cpu():
    if DEVICE.type == "cuda":
        pytest.skip("auto picks the Triton kernels on CUDA")
    reference, _ = _denoiser_pair("dit")
    auto = Denoiser(DenoiserConfig.preset("tiny", arch="dit", attention="auto", adaln="auto"))
    auto.load_state_dict(reference.state_dict())
    x, t, cond, pose = (
        torch.randn(1, 3, 56, 56),
        torch.tensor([5]),
        torch.randn(1, 512),
        torch.rand(1, 5, 56, 56),
    )
    with torch.no_grad():
        assert torch.equal(auto(x, t, cond, pose), reference(x, t, cond, pose))
