"""Randomness as a pure function of (seed, step): what makes `--resume` continue bit-for-bit.

A resumed run does not need to restore any RNG state: every random draw of step t (virtual ids
and noise, flips, dropout) comes from generators seeded with `step_seed(seed, t, stream)`.
"""

from __future__ import annotations

import numpy as np
import torch

STREAMS = {"virtual": 1, "flip": 2, "dropout": 3, "init": 4, "order": 5, "diffusion": 6}


def step_seed(seed: int, step: int, stream: str, rank: int = 0) -> int:
    """A 63-bit seed for one (seed, step, stream, rank), well mixed by NumPy's SeedSequence."""
    entropy = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), STREAMS[stream], int(rank)])
    return int(entropy.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def step_generator(seed: int, step: int, stream: str, rank: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(step_seed(seed, step, stream, rank))
