"""The denoiser's shape and runtime choices: torch-free, so that a command's --help and argument
checks do not wait for torch's import (~2 s on a 2-core CPU). The network: vigface.diffusion.denoiser."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from vigface.errors import VigfaceError

ARCHS = ("uvit", "dit")
PREDICTIONS = ("x0", "v")
ATTENTION = ("sdpa", "triton", "flash", "auto")  # backends of vigface.diffusion.attention
ADALN = ("reference", "triton", "auto")
MLP = ("reference", "cublaslt", "auto")

# name: (width, depth, heads, patch, image size)
DENOISER_SIZES = {
    "tiny": (128, 5, 4, 8, 56),
    "S": (512, 13, 8, 4, 112),
    "B": (768, 13, 12, 4, 112),
}


@dataclass(frozen=True)
class DenoiserConfig:
    arch: str = "uvit"
    image_size: int = 112
    patch: int = 4
    width: int = 768
    depth: int = 13
    heads: int = 12
    mlp_ratio: float = 4.0
    cond_dim: int = 512  # the FR embedding's size
    pose: bool = True  # 5 landmark channels beside x_t
    final_conv: bool = False  # U-ViT's 3x3 conv on the unpatchified output (smooths the patch seams)
    # The FR embedding (unit length) times this before its projection; sqrt(cond_dim) gives its
    # coordinates unit size, like the timestep features it is added to (1.0: models from before)
    cond_scale: float = 1.0
    prediction: str = "x0"
    attention: str = "sdpa"
    adaln: str = "reference"  # a runtime choice: checkpoints load under every value
    mlp: str = "reference"  # a runtime choice too (inference)

    def __post_init__(self):
        def bad(why):
            raise VigfaceError(f"denoiser config: {why}")

        if self.arch not in ARCHS:
            bad(f"arch {self.arch!r} is unknown; choose one of {', '.join(ARCHS)}")
        if self.prediction not in PREDICTIONS:
            bad(f"prediction {self.prediction!r} is unknown; choose one of {', '.join(PREDICTIONS)}")
        if self.attention not in ATTENTION:
            bad(f"attention {self.attention!r} is unknown; choose one of {', '.join(ATTENTION)}")
        if self.adaln not in ADALN:
            bad(f"adaln {self.adaln!r} is unknown; choose one of {', '.join(ADALN)}")
        if self.mlp not in MLP:
            bad(f"mlp {self.mlp!r} is unknown; choose one of {', '.join(MLP)}")
        for name in ("image_size", "patch", "width", "depth", "heads", "cond_dim"):
            if getattr(self, name) < 1:  # 0 divided by zero below; a negative patch tiled nothing
                bad(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (math.isfinite(self.mlp_ratio) and self.mlp_ratio > 0):
            bad(f"mlp_ratio must be a finite number > 0, got {self.mlp_ratio}")
        if not (math.isfinite(self.cond_scale) and self.cond_scale > 0):
            bad(f"cond_scale must be a finite number > 0, got {self.cond_scale}")
        if self.image_size % self.patch:
            bad(f"image_size {self.image_size} is not a multiple of patch {self.patch}")
        if self.width % self.heads:
            bad(f"width {self.width} is not a multiple of heads {self.heads}")
        if self.arch == "uvit" and self.depth % 2 == 0:
            bad(f"uvit needs an odd depth (n in-blocks, a middle block, n out-blocks), got {self.depth}")

    @classmethod
    def preset(cls, name: str, **overrides) -> DenoiserConfig:
        if name not in DENOISER_SIZES:
            raise VigfaceError(
                f"denoiser size {name!r} is unknown; choose one of {', '.join(DENOISER_SIZES)}"
            )
        width, depth, heads, patch, size = DENOISER_SIZES[name]
        return cls(
            **{
                "width": width,
                "depth": depth,
                "heads": heads,
                "patch": patch,
                "image_size": size,
                **overrides,
            }
        )

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch) ** 2

    def to_dict(self) -> dict:
        return asdict(self)
