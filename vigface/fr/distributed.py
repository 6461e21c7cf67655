"""Partial-FC plumbing: class prototypes sharded over ranks, a softmax cross-entropy across shards.

With C classes on W ranks, rank r holds prototypes [lo_r, hi_r) only, so a 1M-class head needs
1/W of the memory per GPU. Each step every rank all-gathers the embeddings of the global batch
(B = W x b rows), computes the (B, C/W) logits of its shard, and the softmax normaliser is
summed over ranks (`sharded_cross_entropy`). With W = 1 every collective is skipped and the same
code computes the ordinary cross-entropy, which is what the tests compare it with.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist

from vigface.errors import BackendUnavailableError, VigfaceWarning, first_line


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_distributed(device_pref: str) -> tuple[int, int, torch.device]:
    """Join the torchrun process group if there is one; (rank, world_size, device)."""
    want_cuda = device_pref in ("auto", "cuda")
    cuda = want_cuda and torch.cuda.is_available()
    if device_pref == "cuda" and not cuda:
        raise BackendUnavailableError("device 'cuda' was requested but torch sees no CUDA device")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world_size = world()
    return rank, world_size, torch.device(f"cuda:{local_rank}" if cuda else "cpu")


def finish_distributed() -> None:
    """Leave the process group at the end of a run, once every rank has got there.

    Without this a rank that finished early exits while its peers may still be inside their last
    collective (which then fails with "Connection closed by peer"), and the group is never
    destroyed (torch warns about it). The ranks check in through the rendezvous store rather than
    the collective backend, and under torchrun a rank that crashes meanwhile gets the whole job
    stopped by the agent, so the wait cannot hang on a dead peer.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    world_size = dist.get_world_size()
    store = dist.distributed_c10d._get_default_store()
    try:
        if store.add("vigface/finished", 1) == world_size:
            store.set("vigface/all_finished", "1")
        store.wait(["vigface/all_finished"])
    except dist.DistNetworkError as exc:
        # The store's host, torchrun's agent, is gone (kill -9): the ranks ran on and wrote their
        # outputs, then each ended in a C++ traceback here.
        why = first_line(exc, 160)
        warnings.warn(
            VigfaceWarning(
                f"rank {dist.get_rank()}: the torchrun launcher's rendezvous store does not answer ({why}); "
                "this rank has finished its part, so it goes on without the other ranks' check-in"
            ),
            stacklevel=2,
        )
    dist.destroy_process_group()


def shard_bounds(num_classes: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) class ranges, sizes differing by at most one."""
    base, extra = divmod(num_classes, world_size)
    bounds, lo = [], 0
    for r in range(world_size):
        hi = lo + base + (1 if r < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


class _GatherRows(torch.autograd.Function):
    """all_gather of (b, d) rows into (W*b, d) whose backward hands each rank its rows' gradient.

    Every rank's loss depends on all B rows through its own shard of the logits, so the gradient of
    the (identical) global loss with respect to rank r's rows is the SUM over ranks of the partial
    gradients. DDP then AVERAGES the backbone gradients over ranks, so the sum is multiplied by W
    here: the backbone then gets the gradient of a one-process run on the global batch, exactly so
    when its rows do not interact. An IResNet's BatchNorm normalises each rank's b rows (no
    SyncBatchNorm, as in insightface's Partial FC), and flips and dropout are drawn per rank, so
    its W-rank run is not the one-process run: the head and loss are.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world_size = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.world_size, ctx.rows = dist.get_rank(), world_size, x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        lo = ctx.rank * ctx.rows
        return grad[lo : lo + ctx.rows] * ctx.world_size


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of every rank in rank order; differentiable (see _GatherRows). Identity with W = 1."""
    if world()[1] == 1:
        return x
    return _GatherRows.apply(x)


def gather_rows_nograd(x: torch.Tensor) -> torch.Tensor:
    if world()[1] == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks of a tensor that carries no gradient; returns it."""
    if world()[1] > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


class _ShardedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target_index: torch.Tensor) -> torch.Tensor:
        # logits (B, C_shard) fp32; target_index (B,) column in this shard or -1.
        row_max = logits.detach().amax(1)
        if world()[1] > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
        exp = torch.exp(logits - row_max[:, None])
        denom = all_reduce_sum(exp.sum(1))
        has = target_index >= 0
        target = torch.where(has, logits.gather(1, target_index.clamp_min(0)[:, None])[:, 0], 0.0)
        target = all_reduce_sum(target - torch.where(has, row_max, 0.0))  # shifted target logit
        ctx.save_for_backward(exp / denom[:, None], target_index)
        return torch.log(denom) - target  # (B,) per-row loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        prob, target_index = ctx.saved_tensors
        grad = prob.clone()
        has = target_index >= 0
        rows = torch.nonzero(has)[:, 0]
        grad[rows, target_index[rows]] -= 1.0
        return grad * grad_loss[:, None], None


def sharded_cross_entropy(logits: torch.Tensor, target_index: torch.Tensor) -> torch.Tensor:
    """Per-row softmax cross-entropy over classes split across ranks: (B, C_shard) -> (B,).

    Every rank gets the same loss values; the gradient flows into its own logits only.
    """
    return _ShardedCrossEntropy.apply(logits.float(), target_index)


def wrap_ddp(module: torch.nn.Module, device: torch.device, world_size: int) -> torch.nn.Module:
    """DistributedDataParallel around `module` when there are several ranks, else the module itself."""
    if world_size == 1:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
