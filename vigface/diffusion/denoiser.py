"""The stage-2 denoiser: a pixel-space ViT with AdaLN conditioning, U-ViT or DiT layout.

    x_t (N, 3, S, S) ++ pose image (N, 5, S, S)   -> patchify (p x p)  -> tokens (N, L, D), L = (S/p)^2
    c = timestep_mlp(sinusoid(t)) + Linear(FR embedding)                   (N, D)
    blocks: AdaLN-Zero  x += g1 * Attn(LN(x) (1 + s1) + b1);  x += g2 * MLP(LN(x) (1 + s2) + b2)
            (s, b, g) = Linear(SiLU(c)) initialised to zero, so every block starts as the identity
    uvit: depth = 2 n + 1 blocks: n "in" blocks, a middle block, n "out" blocks; out block i
          first merges the matching in block's output: x = Linear([x, skip_i]) (long skips, §4.2)
    dit:  depth plain blocks (the later version of the paper)
    final: LN modulated by c, Linear(D -> p*p*3) zero-initialised -> unpatchify (N, 3, S, S)

The output is the x0 estimate (or v, by the config's `prediction`). The unconditional model of
classifier-free guidance is the same network with the FR embedding and the pose image zeroed.
Sizes: `DENOISER_SIZES` in vigface.diffusion.denoiser_config, beside `DenoiserConfig` ("tiny" for
tests/CPU, "S", "B" = ViT-B/4 at 112x112, 784 tokens).

Fast paths (same weights, same state dict): `attention` picks the attention backend (see
vigface.diffusion.attention); `adaln="triton"` runs the LayerNorm + modulate steps as the fused
kernels of vigface.kernels.adaln, each gated residual fused with the LayerNorm + modulate that
follows it (the attention residual with the block's LN2, the MLP residual with the next block's
LN1 or the final norm); "auto" = triton for CUDA tensors, the reference elsewhere. `mlp="cublaslt"`
runs the MLP's first Linear + bias + GELU(tanh) as one cuBLASLt GEMM with a GELU epilogue
(torch._addmm_activation), which saves the GELU's pass over the 4x-wide hidden activations;
inference only (the op has no backward), CUDA only (torch's CPU version computes the exact GELU,
not this model's tanh GELU); "auto" = cublaslt for CUDA tensors outside autograd.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from vigface.diffusion.attention import attention
from vigface.diffusion.denoiser_config import DenoiserConfig
from vigface.errors import BackendUnavailableError, VigfaceError

log = logging.getLogger(__name__)
_auto_logged: set[tuple[str, bool]] = set()
POSE_CHANNELS = 5


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of integer timesteps (N,) -> (N, dim), as in DDPM / DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def fused_adaln_kernels(choice: str, x: torch.Tensor):
    """The vigface.kernels.adaln module when `choice` selects the fused kernels for x, else None."""
    if choice == "reference" or (choice == "auto" and not x.is_cuda):
        kernels = None
    else:
        try:
            from vigface.kernels import adaln as kernels
        except ImportError as exc:
            if choice != "auto":
                raise BackendUnavailableError(f"adaln='triton' needs the triton package ({exc})") from None
            kernels = None
    if choice == "auto" and (x.device.type, kernels is None) not in _auto_logged:
        _auto_logged.add((x.device.type, kernels is None))
        log.info(
            "adaln='auto' chose %s for %s tensors",
            "reference" if kernels is None else "triton",
            x.device.type,
        )
    return kernels


def use_fused_gelu(choice: str, x: torch.Tensor) -> bool:
    """Whether the MLP runs its first Linear + GELU as one cuBLASLt GEMM (see the module notes)."""
    if choice == "reference":
        return False
    differentiating = torch.is_grad_enabled() and x.requires_grad
    if choice == "auto":
        return x.is_cuda and not differentiating
    if not x.is_cuda:
        raise BackendUnavailableError(
            f"mlp='cublaslt' needs CUDA tensors, got {x.device.type} (torch's CPU op computes the exact "
            "GELU, not this model's tanh GELU); use mlp='reference' or 'auto'"
        )
    if differentiating:
        raise VigfaceError(
            "mlp='cublaslt' is for inference (the fused op has no backward); train with 'reference'"
        )
    return True


def conv2d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x), except that on the CPU a 16-bit convolution (or one under CPU autocast) runs in
    float32 and is rounded back to x's dtype.

    Why: oneDNN 3.12 (torch 2.13.0's CPU build) takes AMX kernels for bf16 convolutions on CPUs
    that have AMX, and some shapes come out wrong: the tiny preset's patch embedding (8 input
    channels, 8x8 kernel, stride 8) had a relative error of ~1.1 against float32, 16 channels with a
    4x4 kernel as well, 8 channels with 4x4 were right (ONEDNN_MAX_CPU_ISA=AVX512_CORE, no AMX: all
    right). The model's two convolutions are a small part of its work, so float32 costs little."""
    cpu_16bit = x.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled("cpu")
    if x.device.type != "cpu" or not cpu_16bit:
        return conv(x)
    bias = None if conv.bias is None else conv.bias.float()
    with torch.autocast("cpu", enabled=False):
        out = F.conv2d(x.float(), conv.weight.float(), bias, conv.stride, conv.padding)
    return out.to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, backend: str):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):  # (N, L, D)
        n, length, d = x.shape
        qkv = self.qkv(x).view(n, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(qkv[0], qkv[1], qkv[2], self.backend)  # (N, H, L, D/H)
        return self.proj(out.transpose(1, 2).reshape(n, length, d))


class AdaLNBlock(nn.Module):
    def __init__(self, config: DenoiserConfig, skip: bool = False):
        super().__init__()
        d = config.width
        self.skip_linear = nn.Linear(2 * d, d) if skip else None
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(d, config.heads, config.attention)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        hidden = int(d * config.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        nn.init.zeros_(self.ada[1].weight)  # AdaLN-Zero: the block starts as the identity
        nn.init.zeros_(self.ada[1].bias)
        self.adaln, self.mlp_backend = config.adaln, config.mlp

    def run_mlp(self, h):
        fc1, _, fc2 = self.mlp
        # fp8 linears (engines/fp8.py): the MLP is an Fp8Mlp, which runs its own fused GEMM or not
        if not isinstance(fc1, nn.Linear) or not use_fused_gelu(self.mlp_backend, h):
            return self.mlp(h)
        hidden = torch._addmm_activation(fc1.bias, h.reshape(-1, h.shape[-1]), fc1.weight.t(), use_gelu=True)
        return fc2(hidden.view(*h.shape[:-1], hidden.shape[-1]))

    def forward(self, x, c, skip=None):  # x (N, L, D), c (N, D)
        kernels = fused_adaln_kernels(self.adaln, x)
        if kernels is not None:
            _, x, (y, gate2) = self.forward_fused(kernels, x, c, None, skip)
            return torch.addcmul(x, gate2[:, None], y)
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.run_mlp(modulate(self.norm2(x), shift2, scale2))

    def forward_fused(self, kernels, x, c, pending=None, skip=None):
        """The block on the fused AdaLN kernels, its MLP residual left for the next LayerNorm to add.

        pending: (y, gate), the previous block's residual x += gate * y, not yet added.
        Returns (the input with `pending` added, i.e. the previous block's output; x before this
        block's MLP residual; (MLP output, gate2)). 2 kernels over (N, L, D) per block where the
        eager code runs 10 (2 LayerNorms, 8 element-wise ops), 3 after a long skip.
        """
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=1)  # each (N, D)
        if self.skip_linear is not None:  # the skip Linear sits between the residual and LN1
            if pending is not None:
                x = torch.addcmul(x, pending[1][:, None], pending[0])
            x_in = x
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
            h = kernels.adaln_modulate(x, shift1, scale1, self.norm1.eps)
        elif pending is None:
            x_in, h = x, kernels.adaln_modulate(x, shift1, scale1, self.norm1.eps)
        else:
            x, h = kernels.gated_residual_adaln(x, pending[0], pending[1], shift1, scale1, self.norm1.eps)
            x_in = x
        x, h = kernels.gated_residual_adaln(x, self.attn(h), gate1, shift2, scale2, self.norm2.eps)
        return x_in, x, (self.run_mlp(h), gate2)


class Denoiser(nn.Module):
    def __init__(self, config: DenoiserConfig):
        super().__init__()
        self.config = config
        d, p = config.width, config.patch
        in_channels = 3 + (POSE_CHANNELS if config.pose else 0)
        self.patch_embed = nn.Conv2d(in_channels, d, p, p)
        self.pos = nn.Parameter(torch.zeros(1, config.tokens, d))
        nn.init.normal_(self.pos, std=0.02)
        self.time_mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        self.cond_proj = nn.Linear(config.cond_dim, d)
        if config.arch == "uvit":
            n = config.depth // 2
            self.in_blocks = nn.ModuleList(AdaLNBlock(config) for _ in range(n))
            self.mid_block = AdaLNBlock(config)
            self.out_blocks = nn.ModuleList(AdaLNBlock(config, skip=True) for _ in range(n))
        else:
            self.blocks = nn.ModuleList(AdaLNBlock(config) for _ in range(config.depth))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.final = nn.Linear(d, p * p * 3)
        for layer in (self.final_ada[1], self.final):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.final_conv = nn.Conv2d(3, 3, 3, padding=1) if config.final_conv else None

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, pose: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x_t (N, 3, S, S), t (N,) int, cond (N, cond_dim), pose (N, 5, S, S) -> (N, 3, S, S)."""
        cfg = self.config
        if cfg.pose:
            if pose is None:
                raise VigfaceError("this denoiser was built with a pose condition: pass the landmark image")
            x_t = torch.cat([x_t, pose.to(x_t.dtype)], dim=1)
        x = conv2d(self.patch_embed, x_t).flatten(2).transpose(1, 2) + self.pos  # (N, L, D)
        cond = cond.to(x.dtype) * cfg.cond_scale if cfg.cond_scale != 1.0 else cond.to(x.dtype)
        c = self.time_mlp(timestep_embedding(t, 256).to(x.dtype)) + self.cond_proj(cond)  # (N, D)
        kernels = fused_adaln_kernels(cfg.adaln, x)
        shift, scale = self.final_ada(c).chunk(2, dim=1)
        if kernels is not None:
            x, (y, gate) = self.blocks_fused(kernels, x, c)
            _, h = kernels.gated_residual_adaln(x, y, gate, shift, scale, self.final_norm.eps)
            return self.to_image(self.final(h))
        if cfg.arch == "uvit":
            skips = []
            for block in self.in_blocks:
                x = block(x, c)
                skips.append(x)
            x = self.mid_block(x, c)
            for block in self.out_blocks:
                x = block(x, c, skips.pop())
        else:
            for block in self.blocks:
                x = block(x, c)
        return self.to_image(self.final(modulate(self.final_norm(x), shift, scale)))

    def blocks_fused(self, kernels, x, c):
        """All blocks on the fused kernels, each MLP residual added by the next block's first
        kernel. Returns (x before the last residual, that residual (y, gate))."""
        pending = None
        if self.config.arch == "dit":
            for block in self.blocks:
                _, x, pending = block.forward_fused(kernels, x, c, pending)
            return x, pending
        skips = []
        for i, block in enumerate(self.in_blocks):
            previous_output, x, pending = block.forward_fused(kernels, x, c, pending)
            if i > 0:
                skips.append(previous_output)  # in block i - 1's output, completed here
        previous_output, x, pending = self.mid_block.forward_fused(kernels, x, c, pending)
        if self.in_blocks:
            skips.append(previous_output)
        for block in self.out_blocks:
            _, x, pending = block.forward_fused(kernels, x, c, pending, skips.pop())
        return x, pending

    def to_image(self, x: torch.Tensor) -> torch.Tensor:  # (N, L, p*p*3) -> (N, 3, S, S)
        image = self.unpatchify(x)
        return image if self.final_conv is None else conv2d(self.final_conv, image)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:  # (N, L, p*p*3) -> (N, 3, S, S)
        p, side = self.config.patch, self.config.image_size // self.config.patch
        x = x.view(x.shape[0], side, side, p, p, 3)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], 3, side * p, side * p)
