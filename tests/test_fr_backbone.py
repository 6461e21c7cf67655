"""IResNet / IR-SE backbones: the insightface layout (parameter counts, shapes, head)."""

import pytest
import torch

from vigface.errors import VigfaceError
from vigface.fr.backbone_config import BackboneConfig
from vigface.fr.iresnet import build_backbone


# Published sizes: arcface_torch r18 24.0M, r50 43.6M, r100 65.2M; AdaFace IR-SE-50 43.8M.
@pytest.mark.parametrize(
    "arch,millions", [("iresnet18", 24.0), ("iresnet50", 43.6), ("iresnet100", 65.2), ("irse50", 43.8)]
)
def test_parameter_counts_match_published_models(arch, millions):
    model = build_backbone(BackboneConfig(arch=arch))
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.05)


@pytest.mark.parametrize("arch", ["iresnet18", "irse50"])
@pytest.mark.parametrize("size", [112, 56, 57])
def test_forward_shapes(arch, size):
    model = build_backbone(BackboneConfig(arch=arch, width=8, input_size=size, embedding_dim=32)).eval()
    out = model(torch.randn(3, 3, size, size))
    assert out.shape == (3, 32) and out.dtype == torch.float32


def test_head_layout():
    r = build_backbone(BackboneConfig(arch="iresnet18", width=8))
    assert not r.features.weight.requires_grad and torch.equal(r.features.weight, torch.ones(512))
    se = build_backbone(BackboneConfig(arch="irse50", width=8))
    assert se.features.weight is None  # affine-free feature BN
    assert se.dropout.p == 0.4 and r.dropout.p == 0.0
    # IR-SE's first unit keeps 64 -> 64 channels and only subsamples its shortcut.
    assert isinstance(se.stages[0][0].shortcut, torch.nn.MaxPool2d)
    assert isinstance(r.stages[0][0].shortcut, torch.nn.Sequential)


def test_channels_last_and_bf16_autocast_agree_with_fp32():
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(arch="iresnet18", width=8, input_size=56, embedding_dim=64)).eval()
    x = torch.randn(4, 3, 56, 56)
    ref = model(x)
    cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(cl, ref, atol=1e-4, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x)
    assert low.dtype == torch.float32  # the embedding layers leave autocast
    cos = torch.nn.functional.cosine_similarity(low, ref)
    assert cos.min() > 0.99


def test_bad_config_is_a_clear_error():
    with pytest.raises(VigfaceError, match="arch 'resnet50' is unknown"):
        BackboneConfig(arch="resnet50")
    with pytest.raises(VigfaceError, match="input_size 8"):
        BackboneConfig(input_size=8)
