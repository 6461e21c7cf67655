"""Genuine and imposter similarity distributions of a dataset, and the IoU between two of them.

Fig. 5 of the paper plots, for real and generated data, the cosine similarities of genuine pairs
(two images of one identity) and imposter pairs (two identities); Table 1 measures how well a
guidance scale w reproduces the real distributions by the IoU of the histograms,

    IoU(p, q) = sum_b min(p_b, q_b) / sum_b max(p_b, q_b)       (p, q normalised to sum 1)

computed separately for genuine and imposter pairs; their average picks w (cfg_sweep.py).

The IoU of two finite samples is below 1 even when they come from one distribution, and the more
so the fewer pairs: two draws of one normal (sd 0.15, 100 bins) give 0.52 at 90 values, 0.80 at
900, 0.91 at 5,000 and 0.97 at 50,000. So compare IoUs only at equal pair counts (a sweep's rows
are), and not with the paper's Table 1, which used far more pairs.
"""

from __future__ import annotations

import numpy as np

from vigface.errors import VigfaceError

HIST_BINS = 100
HIST_RANGE = (-1.0, 1.0)  # cosine similarity


def _unit(embeddings) -> np.ndarray:
    e = np.asarray(embeddings, dtype=np.float64)
    if e.ndim != 2:
        raise VigfaceError(f"similarity: need (N, d) embeddings, got shape {e.shape}")
    if not np.all(np.isfinite(e)):
        # A NaN cosine would vanish from the histogram unnoticed and bias the IoU (and the sweep's w).
        raise VigfaceError("similarity: embeddings contain NaN or inf")
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def _triu_unrank(q: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) of the q-th entry of np.triu_indices(m, k=1), elementwise (row-major order)."""
    q, m = q.astype(np.int64), m.astype(np.int64)
    before = lambda i: i * (2 * m - i - 1) // 2  # noqa: E731  (entries in rows < i)
    i = np.floor(((2 * m - 1) - np.sqrt((2.0 * m - 1) ** 2 - 8.0 * q)) / 2).astype(np.int64)
    i = np.clip(i, 0, m - 2)
    i -= before(i) > q  # the square root's rounding, one row either way
    i += before(i + 1) <= q
    return i, q - before(i) + i + 1


def _genuine_pairs(classes: list[np.ndarray], max_pairs: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Every within-class pair (i < j, class by class), or `max_pairs` of them drawn uniformly.

    The draw ranks all pairs without listing them: one class of n images has n^2 / 2 pairs (50 M
    for n = 10,000), which would not fit in memory as index arrays."""
    sizes = np.array([len(c) for c in classes], dtype=np.int64)
    counts = sizes * (sizes - 1) // 2
    if counts.sum() <= max_pairs:
        left, right = [], []
        for members in classes:
            i, j = np.triu_indices(len(members), k=1)
            left.append(members[i])
            right.append(members[j])
        return np.concatenate(left), np.concatenate(right)
    rank = rng.choice(int(counts.sum()), size=max_pairs, replace=False)  # global pair ranks
    ends = np.cumsum(counts)
    k = np.searchsorted(ends, rank, side="right")  # the class each rank falls in
    i, j = _triu_unrank(rank - (ends[k] - counts[k]), sizes[k])
    starts = np.cumsum(sizes) - sizes
    members = np.concatenate(classes)
    return members[starts[k] + i], members[starts[k] + j]


def _all_imposter_pairs(classes: list[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i < j) of two classes, in np.triu_indices(n) order, listed class pair by class
    pair: memory for the imposter pairs only, not for all n^2 / 2 (one class of 30,000 images and
    a few others has few imposter pairs but 450 M pairs in all)."""
    left, right = [np.empty(0, dtype=np.int64)], [np.empty(0, dtype=np.int64)]
    for a, first in enumerate(classes):
        for second in classes[a + 1 :]:
            i, j = np.repeat(first, len(second)), np.tile(second, len(first))
            left.append(np.minimum(i, j))
            right.append(np.maximum(i, j))
    ii, jj = np.concatenate(left), np.concatenate(right)
    row_major = np.argsort(ii * n + jj, kind="stable")
    return ii[row_major], jj[row_major]


def genuine_imposter(
    embeddings, labels, *, max_pairs: int = 50_000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(genuine cosines, imposter cosines) of a labelled set.

    Genuine: every pair i < j within a class; imposter: every pair of different classes, or, when
    there are more than `max_pairs` of either kind, a seeded uniform sample of `max_pairs` of them.
    """
    e = _unit(embeddings)
    labels = np.asarray(labels)
    if isinstance(max_pairs, bool) or not isinstance(max_pairs, (int, np.integer)) or max_pairs < 1:
        raise VigfaceError(f"similarity: max_pairs must be an integer >= 1, got {max_pairs!r}")
    if labels.shape != (len(e),):
        raise VigfaceError(f"similarity: {len(e)} embeddings but labels of shape {labels.shape}")
    labels = np.unique(labels, return_inverse=True)[1].reshape(-1)  # any label type -> 0..C-1
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    classes = np.split(order, bounds)
    gi, gj = _genuine_pairs(classes, max_pairs, rng)
    genuine = np.sum(e[gi] * e[gj], axis=1)
    # Imposter pairs: all of them when few, else sampled with rejection of same-class draws.
    n = len(e)
    total_imposter = (n * (n - 1) - sum(len(m) * (len(m) - 1) for m in classes)) // 2
    if total_imposter <= max_pairs:
        ii, jj = _all_imposter_pairs(classes, n)
    else:
        ii, jj = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        while len(ii) < max_pairs:
            a = rng.integers(n, size=2 * max_pairs)
            b = rng.integers(n, size=2 * max_pairs)
            keep = labels[a] != labels[b]
            ii, jj = np.concatenate([ii, a[keep]]), np.concatenate([jj, b[keep]])
        ii, jj = ii[:max_pairs], jj[:max_pairs]
    imposter = np.sum(e[ii] * e[jj], axis=1)
    return genuine, imposter


def mean_genuine_imposter(embeddings, labels) -> tuple[float, float]:
    """(mean genuine cosine, mean imposter cosine): the same-id / different-id figures of the notes."""
    genuine, imposter = genuine_imposter(embeddings, labels)
    if not len(genuine):  # the mean of no pairs was NaN, with only a RuntimeWarning
        raise VigfaceError("similarity: no genuine pairs (every identity has a single image)")
    if not len(imposter):
        raise VigfaceError("similarity: no imposter pairs (all images have one identity)")
    return float(genuine.mean()), float(imposter.mean())


def histogram(values, bins: int = HIST_BINS, value_range: tuple[float, float] = HIST_RANGE) -> np.ndarray:
    """Bin frequencies summing to 1 (values outside the range land in the end bins)."""
    v = np.asarray(values, dtype=np.float64)
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise VigfaceError(f"similarity: bins must be an integer >= 1, got {bins!r}")
    lo, hi = value_range
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise VigfaceError(f"similarity: value_range must be finite with low < high, got {value_range}")
    if not len(v):
        raise VigfaceError("similarity: cannot make a histogram of no values")
    if np.isnan(v).any():  # np.histogram would drop them silently
        raise VigfaceError("similarity: cannot make a histogram of NaN values")
    v = np.clip(v, *value_range)
    counts, _ = np.histogram(v, bins=bins, range=value_range)
    return counts / counts.sum()


def histogram_iou(a, b, bins: int = HIST_BINS, value_range: tuple[float, float] = HIST_RANGE) -> float:
    """IoU of the normalised histograms of two samples (1: the same histogram, 0: disjoint)."""
    p, q = histogram(a, bins, value_range), histogram(b, bins, value_range)
    return float(np.minimum(p, q).sum() / np.maximum(p, q).sum())


def distribution_iou(real: tuple, synthetic: tuple, bins: int = HIST_BINS) -> dict:
    """Table 1's row for one w: {"genuine", "imposter", "average"} IoU of (genuine, imposter) pairs."""
    genuine = histogram_iou(real[0], synthetic[0], bins)
    imposter = histogram_iou(real[1], synthetic[1], bins)
    return {"genuine": genuine, "imposter": imposter, "average": (genuine + imposter) / 2}


def summary(genuine, imposter) -> dict:
    """Mean/std of both distributions (what the report prints beside the histograms)."""
    return {
        "genuine": {"mean": float(np.mean(genuine)), "std": float(np.std(genuine)), "pairs": len(genuine)},
        "imposter": {
            "mean": float(np.mean(imposter)),
            "std": float(np.std(imposter)),
            "pairs": len(imposter),
        },
    }
