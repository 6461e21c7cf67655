"""IResNet and IR-SE backbones in the insightface layout.

    x (N, 3, 112, 112) in [-1, 1]  (uint8 / 127.5 - 1: mean = std = 0.5)
    stem   conv3x3(3 -> w) BN PReLU                       (N, w, 112, 112)
    stages 4 x [unit(stride 2), unit x (n - 1)]           (N, 8w, 7, 7)
    head   BN2d  Dropout  Flatten  FC(8w*7*7 -> dim)  BN1d  -> embedding (N, dim), not normalised

A unit is the "improved residual" of ArcFace: BN conv3x3 BN PReLU conv3x3(stride) BN (+ SE) plus
a shortcut. `iresnet*` follow insightface's arcface_torch (conv1x1+BN shortcut whenever the
shape changes; feature BN with its scale frozen at 1); `irse50` follows AdaFace's IR-SE-50
(squeeze-excitation in every unit, a strided 1x1 max-pool shortcut when only the stride changes,
Dropout 0.4, affine-free feature BN).

`width` scales every stage (64 -> 16 gives a 1/16-FLOP model for CPU tests) and `input_size`
lets the same net run at 56x56 on a CPU; the defaults are the paper's configuration.
"""

from __future__ import annotations

import torch
from torch import nn

from vigface.fr.backbone_config import STAGE_UNITS, BackboneConfig


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x):
        return x * self.gate(x)


class ImprovedResidualUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, se: bool):
        super().__init__()
        layers = [
            nn.BatchNorm2d(cin, eps=1e-5),
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout, eps=1e-5),
            nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout, eps=1e-5),
        ]
        if se:
            layers.append(SqueezeExcite(cout))
        self.residual = nn.Sequential(*layers)
        if cin == cout and stride == 1:
            self.shortcut = nn.Identity()
        elif cin == cout and se:  # IR-SE: subsample only
            self.shortcut = nn.MaxPool2d(1, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, eps=1e-5)
            )

    def forward(self, x):
        return self.residual(x) + self.shortcut(x)


def _final_side(size: int) -> int:
    for _ in range(4):  # 3x3 stride-2 convs with padding 1: ceil(size / 2)
        size = (size + 1) // 2
    return size


class IResNet(nn.Module):
    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.config = config
        se = config.arch == "irse50"
        w = config.width
        self.stem = nn.Sequential(
            nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w, eps=1e-5), nn.PReLU(w)
        )
        stages, cin = [], w
        for i, units in enumerate(STAGE_UNITS[config.arch]):
            cout = w * 2**i
            blocks = [ImprovedResidualUnit(cin, cout, 2, se)]
            blocks += [ImprovedResidualUnit(cout, cout, 1, se) for _ in range(units - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.Sequential(*stages)
        side = _final_side(config.input_size)
        dropout = config.dropout if config.dropout is not None else (0.4 if se else 0.0)
        self.bn = nn.BatchNorm2d(cin, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin * side * side, config.embedding_dim)
        self.features = nn.BatchNorm1d(config.embedding_dim, eps=1e-5, affine=not se)
        if not se:  # arcface_torch freezes the feature-BN scale at 1 (only its shift trains)
            nn.init.constant_(self.features.weight, 1.0)
            self.features.weight.requires_grad = False
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)  # arcface_torch's init
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, S, S) -> (N, dim)
        x = self.stages(self.stem(x))  # (N, 8w, s, s)
        x = self.dropout(self.bn(x).flatten(1))
        # The embedding layers run in fp32 even under bf16 autocast (as arcface_torch does for fp16):
        # the 25k-wide FC reduction and the feature BN are where low precision hurts accuracy.
        with torch.autocast(x.device.type, enabled=False):
            return self.features(self.fc(x.float()))


def build_backbone(config: BackboneConfig | dict) -> IResNet:
    if isinstance(config, dict):
        config = BackboneConfig(**config)
    return IResNet(config)
