"""The U-ViT / DiT denoiser with AdaLN, the attention dispatcher and the landmark pose image."""

import math

import pytest
import torch

from vigface.diffusion.attention import attention, attention_ref
from vigface.diffusion.denoiser import AdaLNBlock, Denoiser, conv2d
from vigface.diffusion.denoiser_config import DenoiserConfig
from vigface.diffusion.pose import landmark_image
from vigface.errors import BackendUnavailableError, VigfaceError


def tiny(arch="uvit", **kw):
    return DenoiserConfig.preset("tiny", arch=arch, **kw)


def _randomise_zero_layers(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


@pytest.mark.parametrize("arch", ["uvit", "dit"])
def test_starts_at_zero_and_then_depends_on_every_condition(arch):
    torch.manual_seed(0)
    model = Denoiser(tiny(arch)).eval()
    x = torch.randn(2, 3, 56, 56)
    t = torch.tensor([3, 700])
    cond, pose = torch.randn(2, 512), torch.rand(2, 5, 56, 56)
    assert torch.equal(model(x, t, cond, pose), torch.zeros(2, 3, 56, 56))  # zero-init output layer
    _randomise_zero_layers(model)
    base = model(x, t, cond, pose)
    assert base.shape == (2, 3, 56, 56)
    for changed in (
        model(x, t, torch.zeros_like(cond), pose),  # identity dropped (CFG's unconditional branch)
        model(x, t, cond, torch.zeros_like(pose)),  # pose dropped
        model(x, torch.tensor([4, 701]), cond, pose),  # another timestep
        model(x.flip(-1), t, cond, pose),
    ):
        assert (changed - base).abs().max() > 1e-4
    # rows are independent: sample 0 does not see sample 1
    assert torch.allclose(model(x[:1], t[:1], cond[:1], pose[:1]), base[:1], atol=1e-5)


def test_adaln_zero_block_is_the_identity_at_init():
    block = AdaLNBlock(tiny("dit"))
    x, c = torch.randn(2, 49, 128), torch.randn(2, 128)
    assert torch.equal(block(x, c), x)


def test_unpatchify_inverts_patchify():
    model = Denoiser(tiny())
    img = torch.randn(2, 3, 56, 56)
    p = 8
    tokens = img.view(2, 3, 7, p, 7, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 49, p * p * 3)
    assert torch.equal(model.unpatchify(tokens), img)


@pytest.mark.parametrize("tokens", [49, 196, 785])
def test_sdpa_attention_matches_the_formula(tokens):
    g = torch.Generator().manual_seed(tokens)
    q, k, v = (torch.randn(2, 3, tokens, 24, generator=g) for _ in range(3))
    assert torch.allclose(attention(q, k, v, "sdpa"), attention_ref(q, k, v), atol=1e-5)


def test_unavailable_backends_and_bad_configs_are_clear_errors():
    q = torch.randn(1, 1, 4, 8)
    for backend in ("flash", "xformers"):  # triton: tests/test_kernels_attention.py
        with pytest.raises(BackendUnavailableError, match=backend):
            attention(q, q, q, backend)
    with pytest.raises(VigfaceError, match="odd depth"):
        DenoiserConfig(depth=12)
    with pytest.raises(VigfaceError, match="multiple of patch"):
        DenoiserConfig(image_size=110, patch=4)
    with pytest.raises(VigfaceError, match="size 'XL'"):
        DenoiserConfig.preset("XL")
    with pytest.raises(VigfaceError, match="pose condition"):
        Denoiser(tiny())(torch.randn(1, 3, 56, 56), torch.tensor([1]), torch.randn(1, 512))


def _tanh_gelu_addmm(bias, x, weight_t, use_gelu):
    # what torch._addmm_activation computes on CUDA (its CPU version uses the exact GELU)
    assert use_gelu
    return torch.nn.functional.gelu(torch.addmm(bias, x, weight_t), approximate="tanh")


@pytest.mark.parametrize("arch", ["uvit", "dit"])
def test_fused_gelu_mlp_path_is_the_same_function(arch, monkeypatch):
    # mlp="cublaslt" on a CPU: the fused op replaced by its CUDA definition, so the test checks the
    # path around it (flattening, bias, the second Linear) gives the reference module's output
    torch.manual_seed(0)
    model = Denoiser(tiny(arch)).eval()
    _randomise_zero_layers(model)
    x, t = torch.randn(2, 3, 56, 56), torch.tensor([3, 700])
    cond, pose = torch.randn(2, 512), torch.rand(2, 5, 56, 56)
    with torch.no_grad():
        want = model(x, t, cond, pose)
    fused = Denoiser(tiny(arch, mlp="cublaslt")).eval()
    fused.load_state_dict(model.state_dict())
    monkeypatch.setattr("vigface.diffusion.denoiser.use_fused_gelu", lambda choice, h: choice == "cublaslt")
    calls = []
    monkeypatch.setattr(
        torch, "_addmm_activation", lambda *a, **k: calls.append(1) or _tanh_gelu_addmm(*a, **k)
    )
    with torch.no_grad():
        got = fused(x, t, cond, pose)
    assert len(calls) == fused.config.depth
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_fused_gelu_mlp_choices():
    h = torch.randn(2, 4, 128)
    model = Denoiser(tiny(mlp="auto")).eval()
    with torch.no_grad():  # auto on a CPU: the reference module, bit for bit
        x, t, cond, pose = (
            torch.randn(1, 3, 56, 56),
            torch.tensor([5]),
            torch.randn(1, 512),
            torch.rand(1, 5, 56, 56),
        )
        reference = Denoiser(tiny()).eval()
        reference.load_state_dict(model.state_dict())
        assert torch.equal(model(x, t, cond, pose), reference(x, t, cond, pose))
    with pytest.raises(BackendUnavailableError, match="mlp='cublaslt' needs CUDA tensors"):
        AdaLNBlock(tiny(mlp="cublaslt")).run_mlp(h)
    with pytest.raises(VigfaceError, match="mlp 'gelu' is unknown"):
        tiny(mlp="gelu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cublaslt_gelu_mlp_matches_the_reference_on_cuda(dtype):
    torch.manual_seed(0)
    block = AdaLNBlock(tiny()).cuda().to(dtype)
    fused = AdaLNBlock(tiny(mlp="cublaslt")).cuda().to(dtype)
    fused.load_state_dict(block.state_dict())
    h = torch.randn(3, 49, 128, device="cuda", dtype=dtype)
    with torch.no_grad():
        want = block.mlp(h).float()
        got = fused.run_mlp(h).float()
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2  # bf16: the reference rounds before the GELU
    assert (got - want).abs().max().item() <= tolerance
    with pytest.raises(VigfaceError, match="inference"):
        fused.run_mlp(h.requires_grad_())


@pytest.mark.parametrize("arch", ["uvit", "dit"])
def test_final_conv_is_a_3x3_convolution_of_the_unpatchified_output(arch):
    torch.manual_seed(0)
    plain = Denoiser(tiny(arch)).eval()
    _randomise_zero_layers(plain)
    with_conv = Denoiser(tiny(arch, final_conv=True)).eval()
    missing, unexpected = with_conv.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["final_conv.bias", "final_conv.weight"] and not unexpected
    g = torch.Generator().manual_seed(1)
    x, pose, cond = (
        torch.randn(2, 3, 56, 56, generator=g),
        torch.rand(2, 5, 56, 56, generator=g),
        torch.randn(2, 512),
    )
    t = torch.tensor([3, 700])
    with torch.no_grad():
        expected = torch.nn.functional.conv2d(
            plain(x, t, cond, pose), with_conv.final_conv.weight, with_conv.final_conv.bias, padding=1
        )
        assert torch.allclose(with_conv(x, t, cond, pose), expected, atol=1e-6)
        # a centred one-hot kernel without bias is the identity: the plain model again
        with_conv.final_conv.weight.zero_()
        with_conv.final_conv.weight[[0, 1, 2], [0, 1, 2], 1, 1] = 1.0
        with_conv.final_conv.bias.zero_()
        assert torch.allclose(with_conv(x, t, cond, pose), plain(x, t, cond, pose), atol=1e-6)


def test_cond_scale_multiplies_the_condition_before_its_projection_and_loads_old_configs():
    torch.manual_seed(0)
    plain = Denoiser(tiny()).eval()
    _randomise_zero_layers(plain)
    scaled = Denoiser(tiny(cond_scale=8.0)).eval()
    scaled.load_state_dict(plain.state_dict())  # the same parameters: the scale is no weight
    g = torch.Generator().manual_seed(2)
    x, pose = torch.randn(2, 3, 56, 56, generator=g), torch.rand(2, 5, 56, 56, generator=g)
    cond = torch.nn.functional.normalize(torch.randn(2, 512, generator=g), dim=1)
    t = torch.tensor([5, 900])
    with torch.no_grad():
        assert torch.equal(scaled(x, t, cond, pose), plain(x, t, 8.0 * cond, pose))
        assert not torch.allclose(scaled(x, t, cond, pose), plain(x, t, cond, pose), atol=1e-3)
        zero = torch.zeros_like(cond)  # the unconditional branch of guidance is unchanged
        assert torch.equal(scaled(x, t, zero, pose), plain(x, t, zero, pose))
    old = {k: v for k, v in tiny().to_dict().items() if k != "cond_scale"}  # a denoiser.json from before
    assert DenoiserConfig(**old).cond_scale == 1.0
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(VigfaceError, match="cond_scale must be a finite number > 0"):
            tiny(cond_scale=bad)


def test_paper_size_has_784_tokens():
    cfg = DenoiserConfig.preset("B")
    assert cfg.tokens == 784 and cfg.width == 768 and cfg.depth == 13


def test_landmark_image_blobs():
    lm = torch.tensor([[[10.0, 20.0], [30.0, 20.0], [20.0, 30.0], [12.0, 40.0], [28.0, 40.0]]])
    img = landmark_image(lm, 112)
    assert img.shape == (1, 5, 112, 112)
    for j, (x, y) in enumerate(lm[0].tolist()):
        assert img[0, j, int(y), int(x)].item() == pytest.approx(1.0)  # peak on the landmark
        # one pixel off: exp(-1 / (2 sigma^2)) with sigma = 2
        assert img[0, j, int(y), int(x) + 1].item() == pytest.approx(math.exp(-1 / 8), rel=1e-6)
    half = landmark_image(lm, 56)  # pixel centres at integers: x -> (x + 0.5) / 2 - 0.5, sigma 1
    x, y = (10.0 + 0.5) / 2 - 0.5, (20.0 + 0.5) / 2 - 0.5
    expected = math.exp(-((4 - x) ** 2 + (9 - y) ** 2) / 2)
    assert half[0, 0, 9, 4].item() == pytest.approx(expected, rel=1e-5)
    lm[0, 2] = float("nan")
    assert landmark_image(lm, 56)[0, 2].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_16bit_convolutions_run_in_float32(dtype):
    """denoiser.conv2d: oneDNN's AMX bf16 convolution is wrong for some shapes (8 channels, 8x8 patches:
    relative error ~1.1 on an AMX CPU), so on the CPU a 16-bit convolution is the float32 one rounded
    back, bit for bit; the same under CPU autocast with float32 inputs; float32 stays the module's."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 64, 8, 8)
    x = torch.randn(3, 8, 32, 32)
    want = torch.nn.functional.conv2d(x.to(dtype).float(), conv.weight.to(dtype).float(),
                                      conv.bias.to(dtype).float(), 8)  # fmt: skip
    got = conv2d(conv.to(dtype), x.to(dtype))
    assert got.dtype == dtype and torch.equal(got, want.to(dtype))
    conv = conv.float()
    with torch.autocast("cpu", dtype=dtype):
        got = conv2d(conv, x)
    assert got.dtype == torch.float32 and torch.equal(
        got, torch.nn.functional.conv2d(x, conv.weight, conv.bias, 8)
    )
    assert torch.equal(conv2d(conv, x), conv(x))
