"""Run a function on W gloo CPU processes and collect what each rank returns (for the Partial-FC tests)."""

import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vigface.fr.distributed import finish_distributed


def _worker(rank: int, fn, world_size: int, out_dir: str, args: tuple) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(out_dir, 'init')}",
        timeout=timedelta(seconds=120),  # a lost peer fails the test in 2 minutes, not 30
        rank=rank,
        world_size=world_size,
    )
    torch.save(fn(rank, world_size, *args), os.path.join(out_dir, f"rank{rank}.pt"))
    # Teardown: with a bare destroy_process_group a rank aborted ~1 run in 10 on the 2-core machine
    # ("terminate called without an active exception", from a non-Python gloo thread, after the results
    # were saved); it happened once more with finish_distributed alone. Ranks therefore check in
    # through the store, then leave without interpreter finalisation: 0 failures in 25 runs with a
    # busy loop on the other core.
    finish_distributed()
    os._exit(0)


def run_on_gloo_ranks(fn, *args, out_dir, world_size: int = 2) -> list:
    """fn(rank, world_size, *args) on `world_size` processes; the rank-ordered list of its results."""
    mp.spawn(_worker, args=(fn, world_size, str(out_dir), args), nprocs=world_size, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{rank}.pt")) for rank in range(world_size)]
