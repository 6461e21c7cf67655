"""Which margin-softmax and its constants: torch-free, so that a command's --help and argument
checks do not wait for torch's import (~2 s on a 2-core CPU)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from vigface.errors import VigfaceError

DEFAULT_MARGIN = {"arcface": 0.5, "cosface": 0.35, "combined": 0.3, "adaface": 0.4}
MARGINS = tuple(DEFAULT_MARGIN)


@dataclass(frozen=True)
class MarginConfig:
    kind: str = "arcface"
    scale: float = 64.0  # s; the paper uses 30 on CASIA-WebFace and 64 on MS1M-V2
    margin: float | None = (
        None  # m (m2 of combined); None: 0.5 arcface, 0.35 cosface, 0.3 combined, 0.4 adaface
    )
    combined_m1: float = 1.0  # combined only: angular multiplier (insightface's (1.0, 0.3, 0.2))
    combined_m3: float = 0.2  # combined only: additive cosine margin
    adaface_h: float = 0.333
    adaface_t_alpha: float = 0.01

    def __post_init__(self):
        if self.kind not in DEFAULT_MARGIN:
            raise VigfaceError(f"margin kind {self.kind!r} is unknown; choose one of {', '.join(MARGINS)}")
        if not (math.isfinite(self.scale) and self.scale > 0):  # inf / NaN logits train nothing
            raise VigfaceError(f"margin scale must be a finite positive number, got {self.scale}")
        if self.margin is None:
            object.__setattr__(self, "margin", DEFAULT_MARGIN[self.kind])
        if not 0 <= self.margin < math.pi / 2:
            raise VigfaceError(f"margin m must be in [0, pi/2), got {self.margin}")
        if self.kind == "combined" and not (0 < self.combined_m1 < math.inf and 0 <= self.combined_m3 < 1):
            raise VigfaceError(
                "combined margin needs m1 > 0 and m3 in [0, 1), "
                f"got m1={self.combined_m1} m3={self.combined_m3}"
            )

    def to_dict(self) -> dict:
        return asdict(self)
