"""The backbone's shape (arch, width, input size, embedding size): torch-free, so that a command's
--help and argument checks do not wait for torch's import (~2 s on a 2-core CPU)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from vigface.errors import VigfaceError

# Units per stage for each depth (insightface iresnet.py, AdaFace net.py).
STAGE_UNITS = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "irse50": (3, 4, 14, 3),
}
ARCHS = tuple(STAGE_UNITS)


@dataclass(frozen=True)
class BackboneConfig:
    arch: str = "iresnet50"
    embedding_dim: int = 512
    width: int = 64  # channels of the stem and first stage; stages use w, 2w, 4w, 8w
    input_size: int = 112
    dropout: float | None = None  # None: the arch's own default (0 for iresnet, 0.4 for irse50)

    def __post_init__(self):
        if self.arch not in STAGE_UNITS:
            raise VigfaceError(f"backbone arch {self.arch!r} is unknown; choose one of {', '.join(ARCHS)}")
        for name in ("embedding_dim", "width", "input_size"):
            if getattr(self, name) < 1:
                raise VigfaceError(f"backbone {name} must be positive, got {getattr(self, name)}")
        if self.input_size < 16:
            raise VigfaceError(f"backbone input_size {self.input_size} is below 16 (four stride-2 stages)")
        # p > 1 failed inside nn.Dropout; p = 1 zeroes the whole embedding
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise VigfaceError(f"backbone dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)
