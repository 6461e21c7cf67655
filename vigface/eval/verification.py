"""1:1 verification accuracy with the LFW protocol: 10 folds, threshold chosen on the other 9.

On a .bin set (`verify_bin`): every image is embedded as f(x) + f(mirror(x)), L2-normalised, pairs
are scored by cosine, and the accuracy is reported as mean +- std over the 10 held-out folds
(`summarise` adds the average over sets and `gap_to_real` the paper's GR).

Folds are contiguous blocks of pairs (insightface's KFold(shuffle=False)), which in the .bin
files our toy world writes are identity-disjoint, as LFW's are. Where insightface scans a
fixed grid of distance thresholds, we take the exact best threshold on the training folds
(every cut between two distinct scores is tried), so the accuracy does not depend on a grid.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vigface.errors import VigfaceError, VigfaceWarning


@dataclass(frozen=True)
class VerificationResult:
    accuracy: float  # mean over folds of the held-out fold accuracy
    std: float
    fold_accuracies: tuple[float, ...]
    thresholds: tuple[float, ...]  # cosine thresholds picked per fold: "same" when score > threshold


def best_threshold(scores: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
    """The threshold maximising accuracy of `score > t` on these pairs: (threshold, accuracy).

    Ties in accuracy go to the highest threshold, so the result does not depend on pair order.
    """
    scores = np.asarray(scores, dtype=np.float64)
    issame = _same_flags(issame)
    _check_pair_shapes(scores, issame)
    n = len(scores)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], issame[order]
    k = np.arange(n + 1)  # predict the k highest scores "same"
    tp = np.concatenate([[0], np.cumsum(y)])
    correct = tp + (n - y.sum()) - (k - tp)
    valid = np.ones(n + 1, dtype=bool)
    valid[1:n] = s[:-1] > s[1:]  # a cut cannot split tied scores
    correct = np.where(valid, correct, -1)
    best = int(np.argmax(correct))
    if best == 0:
        thr = s[0] + 1.0 if n else 0.0
    elif best == n:
        thr = s[-1] - 1.0
    else:
        thr = 0.5 * (s[best - 1] + s[best])
    return float(thr), float(correct[best] / max(n, 1))


def _same_flags(issame) -> np.ndarray:
    """issame as bool, refusing anything but booleans or 0 / 1: np.asarray(..., dtype=bool) read
    "no", 2 / 5 and 0.3 all as "same", for an accuracy of 1.0."""
    labels = np.asarray(issame)
    if labels.dtype != bool and not (
        np.issubdtype(labels.dtype, np.number) and np.isin(labels, (0, 1)).all()
    ):
        raise VigfaceError(
            f"verification: issame must be booleans or 0 / 1, got {labels.dtype} {labels.ravel()[:4]}"
        )
    return labels.astype(bool)


def _check_pair_shapes(scores: np.ndarray, issame: np.ndarray) -> None:
    if scores.shape != issame.shape or scores.ndim != 1:
        raise VigfaceError(
            f"verification: scores {scores.shape} and issame {issame.shape} must be equal 1-D shapes"
        )


def verify_scores(scores: np.ndarray, issame: np.ndarray, n_folds: int = 10) -> VerificationResult:
    """10-fold accuracy of similarity `scores` (higher = more alike) against `issame`."""
    scores = np.asarray(scores, dtype=np.float64)
    issame = _same_flags(issame)
    _check_pair_shapes(scores, issame)
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
        raise VigfaceError(f"verification: n_folds must be an integer >= 2, got {n_folds!r}")
    if len(scores) < n_folds:
        raise VigfaceError(f"verification: {len(scores)} pairs cannot be split into {n_folds} folds")
    if not np.all(np.isfinite(scores)):
        raise VigfaceError("verification: scores contain NaN or inf (did the model diverge?)")
    folds = np.array_split(np.arange(len(scores)), n_folds)
    accs, thrs = [], []
    for test in folds:
        train = np.setdiff1d(np.arange(len(scores)), test)
        thr, _ = best_threshold(scores[train], issame[train])
        accs.append(float(np.mean((scores[test] > thr) == issame[test])))
        thrs.append(thr)
    return VerificationResult(float(np.mean(accs)), float(np.std(accs)), tuple(accs), tuple(thrs))


def verify_embeddings(embeddings: np.ndarray, issame: np.ndarray, n_folds: int = 10) -> VerificationResult:
    """Embeddings of the 2P images of a .bin (pair p = rows 2p, 2p+1) -> 10-fold accuracy on cosine."""
    e = np.asarray(embeddings, dtype=np.float64)
    if e.ndim != 2 or len(e) != 2 * len(issame):
        raise VigfaceError(f"verification: need 2 x {len(issame)} embeddings, got shape {e.shape}")
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    return verify_scores(np.sum(e[0::2] * e[1::2], axis=1), issame, n_folds)


# ---- .bin sets: the benchmark protocol -------------------------------------------------------

# The five benchmarks of the paper's Table 2 (insightface's file stems) and how tables name them.
BENCHMARKS = {"lfw": "LFW", "cfp_fp": "CFP-FP", "cplfw": "CPLFW", "agedb_30": "AgeDB", "calfw": "CALFW"}


def verify_bin(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    n_folds: int = 10,
) -> VerificationResult:
    """10-fold accuracy of a backbone on a verification .bin.

    Each image's embedding is f(x) + f(mirror(x)), L2-normalised (insightface's protocol, done
    by `embed_images(flip=True)`); pairs are scored by cosine.
    """
    from vigface.data.verification_bin import load_verification_pairs
    from vigface.fr.embed import embed_images

    images, issame = load_verification_pairs(path)
    issame = np.asarray(issame)
    if issame.all() or not issame.any():  # any model scores 100 % there: say so
        kind = "genuine" if issame[0] else "imposter"
        warnings.warn(
            VigfaceWarning(
                f"{path}: all its {len(issame)} pairs are {kind} pairs; its accuracy says nothing of a model"
            ),
            stacklevel=2,
        )
    emb = embed_images(model, images, batch_size=batch_size, flip=True, normalize=True, device=device)
    return verify_embeddings(emb, issame, n_folds)


def verify_bins(model: torch.nn.Module, paths, **kwargs) -> dict[str, VerificationResult]:
    """{file stem: result} for every .bin in `paths` (in the given order)."""
    paths = [str(p) for p in paths]
    stems = [Path(p).stem for p in paths]
    for i, (stem, path) in enumerate(zip(stems, paths, strict=True)):  # all before the first is embedded
        if stem in stems[:i]:
            first = paths[stems.index(stem)]
            if Path(first).resolve() == Path(path).resolve():
                raise VigfaceError(f"verification: {path} is given twice; give each set once")
            raise VigfaceError(f"verification: {first} and {path} are both named {stem!r}; rename one")
    return {stem: verify_bin(model, path, **kwargs) for stem, path in zip(stems, paths, strict=True)}


def gap_to_real(avg_real: float, avg_syn: float) -> float:
    """The paper's Gap-to-Real, GR = (avg_real - avg_syn) / avg_syn (a fraction; x100 for %)."""
    if not avg_syn > 0:
        raise VigfaceError(f"gap to real: the synthetic average must be positive, got {avg_syn}")
    return (avg_real - avg_syn) / avg_syn


def summarise(results: dict[str, VerificationResult]) -> dict:
    """JSON-ready table: per set mean/std/folds (in %), the average over sets, and the
    five-benchmark average when all five of BENCHMARKS are present."""
    sets = {
        name: {
            "accuracy": 100 * r.accuracy,
            "std": 100 * r.std,
            "folds": [100 * a for a in r.fold_accuracies],
            "thresholds": list(r.thresholds),
        }
        for name, r in results.items()
    }
    accuracies = [s["accuracy"] for s in sets.values()]
    five = [sets[k]["accuracy"] for k in BENCHMARKS if k in sets]
    return {
        "sets": sets,
        "average": float(np.mean(accuracies)) if accuracies else None,
        "five_benchmark_average": float(np.mean(five)) if len(five) == len(BENCHMARKS) else None,
    }
