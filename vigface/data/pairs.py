"""Verification pairs in the LFW layout: 10 identity-disjoint folds of genuine and imposter pairs,
written as a `.bin` that `vigface-eval verify`, `--val` and insightface read.

The toy world writes its toy_val.bin / toy_pose.bin with these helpers; `vigface data pairs` makes
one from any aligned dataset (a held-out part of your own data), so training can be validated on it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from vigface.data.images import decode_image
from vigface.data.verification_bin import write_bin
from vigface.errors import VigfaceError, VigfaceWarning

N_FOLDS = 10
# Genuine pairs a fold may draw per distinct one it holds: a few repeats are warned about, more refused.
MAX_REPEATS = 10


def fold_pairs(rng, ids, left, right, n_pos: int, n_neg: int, distinct: bool):
    """Pairs of one fold: `n_pos` same-identity then `n_neg` different-identity pairs.

    left[a] / right[a] are the image slots of identity a that may stand first / second in a
    pair; `distinct` excludes pairing a slot with itself (when left is right).
    """
    candidates = [(a, i, j) for a in ids for i in left[a] for j in right[a] if not (distinct and j <= i)]
    pick = rng.choice(len(candidates), size=n_pos, replace=len(candidates) < n_pos)
    pairs = [(candidates[k][1], candidates[k][2]) for k in pick]
    for _ in range(n_neg):
        a, b = rng.choice(ids, size=2, replace=False)
        pairs.append((int(rng.choice(left[a])), int(rng.choice(right[b]))))
    return pairs, [True] * n_pos + [False] * n_neg


def repeated_pairs(pairs_by_fold) -> int:
    """How many pairs of `pairs_by_fold` (fold_pairs results) repeat an earlier one, in either order."""
    drawn = [tuple(sorted(pair)) for fold, _ in pairs_by_fold for pair in fold]
    return len(drawn) - len(set(drawn))


def write_pairs_bin(path: Path, encoded, pairs_by_fold) -> None:
    """`encoded[i]`: the bytes of image slot i (a list, or anything indexable by slot)."""
    images, issame = [], []
    for pairs, same in pairs_by_fold:
        for (i, j), s in zip(pairs, same, strict=True):
            images += [encoded[i], encoded[j]]
            issame.append(s)
    write_bin(path, images, issame)


def make_pairs_bin(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    pairs: int = 6000,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Draw `pairs` pairs (half genuine) from the labelled dataset `data` into the .bin `out`.

    Identities are shuffled and split into 10 folds; each fold's pairs use its own identities only,
    so the 10-fold protocol never tunes its threshold on a test identity. Images are copied as
    encoded. Pairs are drawn at random, so a small set may repeat some: that is warned about.
    Returns {"pairs", "identities", "images", "repeated"}."""
    from vigface.data.alignment_check import check_dataset_alignment
    from vigface.data.loaders.source import FaceSource

    out = Path(out)
    if pairs <= 0 or pairs % (2 * N_FOLDS):
        raise VigfaceError(
            f"--pairs {pairs}: must be a positive multiple of {2 * N_FOLDS} (10 folds, half genuine)"
        )
    if seed < 0:
        raise VigfaceError(f"--seed must be >= 0, got {seed}")
    if out.suffix != ".bin":
        raise VigfaceError(f"--out {out}: must end in .bin")
    if out.is_dir():
        raise VigfaceError(f"--out {out}: is a folder; the .bin file is written there")
    if out.exists() and not overwrite:
        raise VigfaceError(f"{out}: already exists; pass --overwrite to replace it")
    source = FaceSource(data)
    check_dataset_alignment(source, "DATASET", name=data)
    labels = source.labels
    counts = np.bincount(labels)
    ids = np.flatnonzero(counts >= 2)  # a genuine pair needs two images
    if len(ids) < 2 * N_FOLDS:
        raise VigfaceError(
            f"{data}: {len(ids)} identities have 2 or more images; 10 identity-disjoint folds need at "
            f"least {2 * N_FOLDS}"
        )
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    groups = np.array_split(rng.permutation(ids), N_FOLDS)
    slots = {int(a): np.flatnonzero(labels == a).tolist() for a in ids}
    n_half = pairs // (2 * N_FOLDS)
    fewest = min(sum(counts[a] * (counts[a] - 1) // 2 for a in g) for g in groups)
    if n_half > MAX_REPEATS * fewest:  # mostly the same pairs again (--pairs 10**9 also ran for hours)
        raise VigfaceError(
            f"--pairs {pairs}: a fold of {data} holds only {fewest:,} distinct genuine pairs, so each "
            f"would repeat over {MAX_REPEATS} times; ask for at most {MAX_REPEATS * fewest * 2 * N_FOLDS:,}"
        )
    folds = [fold_pairs(rng, [int(a) for a in g], slots, slots, n_half, n_half, True) for g in groups]
    repeats = repeated_pairs(folds)
    if repeats:  # too few images per identity (or identities) for this many distinct pairs
        warnings.warn(
            VigfaceWarning(
                f"{data}: {repeats} of the {pairs} pairs repeat another; ask for fewer --pairs, or hold out "
                "more identities or images"
            ),
            stacklevel=2,
        )
    used = sorted({i for fold, _ in folds for pair in fold for i in pair})
    encoded = {}
    for i in used:  # decoded once here: verification refused such a .bin only when it was used
        encoded[i] = source.encoded(i)
        decode_image(encoded[i], data, what=f"image {source.describe(i)}")
    write_pairs_bin(out, encoded, folds)
    return {"pairs": pairs, "identities": len(ids), "images": len(used), "repeated": repeats}
