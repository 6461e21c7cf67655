"""The VIGFace head: n real prototypes W_R and k virtual prototypes W_V under one margin softmax.

Paper §4.1 (eqs. 3, 5-7). Rows of the prototype matrix are classes [0, n) real, [n, n + k)
virtual; they are sharded over ranks as in Partial FC (`distributed.py`). One training step:

    real:    cos(f(x_i), W) for the global batch, margin on the target, cross-entropy    (eq. 3)
    sigma^2 = mean_i (f(x_i) - w_{y_i})^2, per dimension, over the global batch          (eq. 6)
    sigma   = alpha sigma_batch + (1 - alpha) sigma_prev,  alpha = 0.9                   (eq. 7)
    virtual: f'_j = w_v[j] + N(0, 1) sigma for B random virtual ids j                      (eq. 5)
             cos(f'_j, W), same margin, cross-entropy
    loss = CE_real + CE_virtual

Design choices the paper leaves open, made here:
- f and w enter eqs. 5-6 L2-normalised: the margin softmax only sees directions, and the raw
  prototype norm is arbitrary (it shrinks under weight decay), so sigma is measured and applied on
  the unit sphere where the cosines live. A side effect: the cosine renormalises f'_j, so noise of
  squared norm r^2 = mean |f - w|^2 = 2 - 2 cos puts f'_j at cos 1 / sqrt(1 + r^2) from its
  prototype, closer than the real features it copies (0.71 where they sit at 0.5, 0.79 at 0.7): the
  virtual rows are easier, with a smaller loss and gradient for W_V, than "the real embeddings'
  spread" suggests. Matching the angle instead would be another reading of eq. 5; not measured.
- The virtual embeddings are constants (built without gradient) and the real prototypes enter the
  virtual logits detached, so the virtual part's gradient reaches W_V only, never the backbone
  and never W_R (Fig. 2). W_V still gets gradient from the real rows, where it sits in the
  softmax denominator: without the virtual part that is all it gets, which pushes every virtual
  prototype away from the real features towards the same point (the collapse of Fig. 3a).
- The two cross-entropies are summed, each a mean over its B rows, so turning the virtual part
  off (the ablation) leaves the backbone's loss unchanged.
- The B virtual ids and noise of step t are drawn from a generator seeded by (seed, t), the same
  on every rank; each rank computes all B virtual rows for its shard, so the result does not
  depend on the number of ranks.

Two implementations of the same loss (`loss=`): "reference" materialises the (B, C_shard) logits
below; "fused" (`vigface/kernels/margin_softmax.py`) applies the margin to the B target cosines
here and lets Triton kernels do the softmax over classes blockwise, real and virtual rows in one
call, never storing a (B, C) matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vigface.errors import BackendUnavailableError, VigfaceError
from vigface.fr.distributed import (
    all_reduce_sum,
    gather_rows,
    gather_rows_nograd,
    shard_bounds,
    sharded_cross_entropy,
    world,
)
from vigface.fr.margin_config import MarginConfig
from vigface.fr.margins import MarginHead
from vigface.fr.rng import step_generator

HEAD_LOSSES = ("auto", "fused", "reference")
# The fused kernels save memory, not time. On an H200 (bench/results/margin_softmax_tune_cuda.json,
# 512 rows x 100k classes x 512, forward + backward, tuned tiles) the reference takes 5.4 ms with
# fp32 matmuls and 2.8 ms with TF32, the fused kernels 35.8 ms and 4.0 ms (Triton's fp32 dots run
# without tensor cores). So 'auto' takes the reference unless its logits would crowd the GPU: about
# REFERENCE_LOGIT_MATRICES (rows x classes) fp32 matrices are alive at its peak (measured,
# bench/results/margin_softmax_cuda.json), and more than REFERENCE_MEMORY_SHARE of the device's
# memory for them is left to the backbone's activations instead.
REFERENCE_LOGIT_MATRICES = 3.3
REFERENCE_MEMORY_SHARE = 1 / 8


def device_memory_bytes(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).total_memory


def reference_loss_bytes(rows: int, classes: int) -> int:
    """The reference's working memory for `rows` x `classes` (this rank's shard) logits."""
    return int(REFERENCE_LOGIT_MATRICES * rows * classes * 4)


def resolve_head_loss(choice: str, device: torch.device, rows: int = 0, classes: int = 0) -> str:
    """'auto': 'reference', or on CUDA 'fused' when the reference's logits for `rows` x `classes`
    would take more than REFERENCE_MEMORY_SHARE of the GPU (and Triton can run there); an explicit
    'fused' must be able to run."""
    if choice not in HEAD_LOSSES:
        raise VigfaceError(f"loss {choice!r} is unknown; choose one of {', '.join(HEAD_LOSSES)}")
    if choice == "auto":
        if device.type != "cuda":
            return "reference"
        if reference_loss_bytes(rows, classes) <= REFERENCE_MEMORY_SHARE * device_memory_bytes(device):
            return "reference"
        try:
            return resolve_head_loss("fused", device)
        except BackendUnavailableError:  # no Triton: the reference is the only way left
            return "reference"
    if choice == "fused":
        try:
            from vigface.kernels.margin_softmax import fused_unavailable_reason
        except ImportError as exc:  # Triton is missing (it ships with torch on Linux only)
            raise BackendUnavailableError(f"loss 'fused' needs Triton: {exc}") from None
        why = fused_unavailable_reason(device)
        if why is not None:
            raise BackendUnavailableError(f"loss 'fused' on {device}: {why}; use --loss reference")
    return choice


class VirtualPrototypeHead(nn.Module):
    def __init__(
        self,
        num_real: int,
        num_virtual: int,
        embedding_dim: int,
        margin: MarginConfig,
        *,
        virtual_embeddings: bool = True,
        sigma_alpha: float = 0.9,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        loss: str = "reference",
    ):
        super().__init__()
        if loss not in ("fused", "reference"):
            raise VigfaceError(f"head loss {loss!r} is unknown; choose fused or reference")
        self.loss = loss
        if rank is None or world_size is None:
            rank, world_size = world()
        self.num_real, self.num_virtual, self.embedding_dim = num_real, num_virtual, embedding_dim
        self.num_classes = num_real + num_virtual
        self.virtual_embeddings = virtual_embeddings and num_virtual > 0
        self.sigma_alpha = sigma_alpha
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.lo, self.hi = shard_bounds(self.num_classes, world_size)[rank]
        # Initialise the full matrix from the seed and keep this rank's rows, so the initial
        # prototypes do not depend on how many ranks share them.
        g = torch.Generator().manual_seed(seed)
        full = torch.randn(self.num_classes, embedding_dim, generator=g) * 0.01
        self.weight = nn.Parameter(full[self.lo : self.hi].clone())  # (C_shard, d)
        self.margin = MarginHead(margin)
        self.register_buffer("sigma", torch.zeros(embedding_dim))  # eq. 7 state
        self.register_buffer("sigma_steps", torch.zeros((), dtype=torch.long))  # updates so far

    # ---- eqs. 6-7 ----------------------------------------------------------------------------

    @torch.no_grad()
    def batch_sigma(
        self, e_hat: torch.Tensor, target_index: torch.Tensor, w_hat: torch.Tensor
    ) -> torch.Tensor:
        """sigma_batch = sqrt(mean_i (f_i - w_{y_i})^2) per dimension over the global batch (eq. 6)."""
        rows = torch.nonzero(target_index >= 0)[:, 0]
        sq = ((e_hat[rows] - w_hat[target_index[rows]]) ** 2).sum(0)
        return torch.sqrt(all_reduce_sum(sq) / e_hat.shape[0])

    @torch.no_grad()
    def update_sigma(self, sigma_batch: torch.Tensor) -> None:
        """sigma <- alpha sigma_batch + (1 - alpha) sigma_prev (eq. 7); the first step takes sigma_batch."""
        a = self.sigma_alpha
        first = self.sigma_steps == 0
        self.sigma.copy_(torch.where(first, sigma_batch, a * sigma_batch + (1 - a) * self.sigma))
        self.sigma_steps += 1

    def draw_virtual(self, step: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Virtual ids j (B,) in [0, k) and N(0, 1) noise (B, d) of this step, equal on all ranks."""
        g = step_generator(self.seed, step, "virtual")
        ids = torch.randint(0, self.num_virtual, (batch,), generator=g)
        noise = torch.randn(batch, self.embedding_dim, generator=g)
        return ids, noise

    # ---- forward -----------------------------------------------------------------------------

    def _target_index(self, labels: torch.Tensor) -> torch.Tensor:
        inside = (labels >= self.lo) & (labels < self.hi)
        return torch.where(inside, labels - self.lo, -1)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        """Loss of this rank's (b, d) embeddings with real labels in [0, n); same value on all ranks.

        Returns (loss, stats) where stats holds detached tensors (no host sync here).
        """
        e = gather_rows(embeddings.float())  # (B, d), B = W b
        y = gather_rows_nograd(labels)
        batch = e.shape[0]
        e_hat = F.normalize(e, dim=1)
        w_hat = F.normalize(self.weight, dim=1)  # (C_shard, d)
        target = self._target_index(y)
        scaler = None
        if self.margin.config.kind == "adaface":
            scaler = self.margin.adaface_scaler(e.norm(dim=1), update=self.training)
        virtual = None
        if self.virtual_embeddings:
            if self.training:
                self.update_sigma(self.batch_sigma(e_hat.detach(), target, w_hat.detach()))
            virtual = self._virtual_rows(w_hat, step, batch)
        if self.loss == "fused":
            loss_real, loss_virtual = self._fused_losses(e_hat, w_hat, target, scaler, virtual)
        else:
            loss_real, loss_virtual = self._reference_losses(e_hat, w_hat, target, scaler, virtual)
        stats = {"loss_real": loss_real.detach()}
        if virtual is None:
            return loss_real, stats
        stats["loss_virtual"] = loss_virtual.detach()
        stats["sigma_mean"] = self.sigma.mean()
        return loss_real + loss_virtual, stats

    def _virtual_rows(self, w_hat: torch.Tensor, step: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 5 on the unit sphere: (B, d) virtual embeddings (constants) and their target columns."""
        ids, noise = self.draw_virtual(step, batch)
        ids, noise = ids.to(w_hat.device), noise.to(w_hat.device)
        v_target = self._target_index(self.num_real + ids)
        with torch.no_grad():  # each rank fills in the w_v[j] it owns
            w_v = torch.zeros(batch, self.embedding_dim, device=w_hat.device)
            own = torch.nonzero(v_target >= 0)[:, 0]
            w_v[own] = w_hat[v_target[own]]
            f_virtual = F.normalize(all_reduce_sum(w_v) + noise * self.sigma, dim=1)
        return f_virtual, v_target

    def _virtual_class_mask(self, device: torch.device) -> torch.Tensor:
        return torch.arange(self.lo, self.hi, device=device) >= self.num_real  # (C_shard,)

    def _reference_losses(self, e_hat, w_hat, target, scaler, virtual):
        """Both cross-entropies from materialised (B, C_shard) logits."""
        logits = self.margin.logits(e_hat @ w_hat.T, target, scaler)  # (B, C_shard)
        loss_real = sharded_cross_entropy(logits, target).mean()
        if virtual is None:
            return loss_real, None
        f_virtual, v_target = virtual
        is_virtual_class = self._virtual_class_mask(e_hat.device)
        w_for_virtual = torch.where(is_virtual_class[:, None], w_hat, w_hat.detach())
        v_logits = self.margin.logits(f_virtual @ w_for_virtual.T, v_target, None)
        return loss_real, sharded_cross_entropy(v_logits, v_target).mean()

    def _fused_losses(self, e_hat, w_hat, target, scaler, virtual):
        """Both cross-entropies from one call of the fused kernels (real rows, then virtual rows)."""
        from vigface.kernels.margin_softmax import margin_cross_entropy

        batch = e_hat.shape[0]
        rows, targets = e_hat, target
        if virtual is not None:
            f_virtual, v_target = virtual
            rows, targets = torch.cat([e_hat, f_virtual]), torch.cat([target, v_target])
            if scaler is not None:  # virtual rows have no feature norm: AdaFace's g = 0 there
                scaler = torch.cat([scaler, torch.zeros_like(scaler)])
        per_row = margin_cross_entropy(
            rows,
            w_hat,
            targets,
            self.margin.config.scale,
            lambda cos: self.margin.target_cosine(cos, scaler),
            num_real_rows=batch,
            first_virtual_col=min(max(self.num_real - self.lo, 0), self.hi - self.lo),
        )
        loss_virtual = per_row[batch:].mean() if virtual is not None else None
        return per_row[:batch].mean(), loss_virtual

    # ---- the whole matrix, for checkpoints and reports ---------------------------------------

    def full_weight(self) -> torch.Tensor:
        """All (n + k, d) prototypes, gathered from every rank (a collective: call on all ranks)."""
        return gather_shards(self.weight.detach(), self.num_classes)

    @torch.no_grad()
    def load_full_weight(self, full: torch.Tensor) -> None:
        self.weight.copy_(full[self.lo : self.hi])


def gather_shards(shard: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Concatenate every rank's (C_r, ...) shard in rank order; shards may differ in size by one."""
    rank, world_size = world()
    if world_size == 1:
        return shard
    bounds = shard_bounds(num_classes, world_size)
    rows = max(hi - lo for lo, hi in bounds)
    padded = torch.zeros(rows, *shard.shape[1:], dtype=shard.dtype, device=shard.device)
    padded[: shard.shape[0]] = shard
    parts = gather_rows_nograd(padded).split(rows)
    return torch.cat([p[: hi - lo] for p, (lo, hi) in zip(parts, bounds, strict=True)])
