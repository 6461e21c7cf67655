"""Which images rank r reads at step t of epoch e: the same plan for every loader.

Step t of epoch e takes rows [t G, (t + 1) G) of an order (a permutation seeded by (seed, e) when
shuffling, else 0..N-1), G = batch_size x world_size; rank r takes its `batch_size` rows of that
global batch, so W ranks together read what one process would. This is
`vigface.fr.data.GlobalBatchSampler`'s plan (same permutation, bit for bit), so a trainer switching
to a loader keeps its data order, and a resumed run skips to step t without replaying anything.

drop_last=False adds the remainder (N mod G images) as one more step: it is split into W nearly
equal parts (sizes differ by at most one), so every image is read exactly once per epoch across
ranks. If the remainder is smaller than W, some ranks get no part and have one step fewer.
"""

from __future__ import annotations

import numpy as np
import torch

from vigface.errors import VigfaceError
from vigface.fr.rng import step_seed


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The order of epoch `epoch`: torch.randperm seeded like GlobalBatchSampler, or 0..n-1."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    g = torch.Generator().manual_seed(step_seed(seed, epoch, "order"))
    return torch.randperm(n, generator=g).numpy()


def steps_per_epoch(n: int, batch_size: int, world_size: int, drop_last: bool) -> int:
    """Steps of one epoch, the same on every rank (a rank may find its last step empty, see above)."""
    full, rest = divmod(n, batch_size * world_size)
    return full + (1 if rest and not drop_last else 0)


def rank_batches(
    n: int,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
    shuffle: bool,
    drop_last: bool,
    first_step: int = 0,
) -> list[np.ndarray]:
    """Rank `rank`'s index arrays for steps [first_step, steps_per_epoch) of epoch `epoch`."""
    if not 0 <= rank < world_size:
        raise VigfaceError(f"rank must be in [0, world_size={world_size}), got {rank}")
    order = epoch_order(n, seed, epoch, shuffle)
    global_batch = batch_size * world_size
    full = n // global_batch
    batches = []
    for t in range(first_step, full):
        lo = t * global_batch + rank * batch_size
        batches.append(order[lo : lo + batch_size])
    if not drop_last and n % global_batch and first_step <= full:
        mine = np.array_split(order[full * global_batch :], world_size)[rank]
        if len(mine):
            batches.append(mine)
    return batches
