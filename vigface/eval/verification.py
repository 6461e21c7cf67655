"""1:1 verification accuracy with the LFW protocol: 10 folds, threshold chosen on the other 9.

Folds are contiguous blocks of pairs (insightface's KFold(shuffle=False)), which in the .bin
files our toy world writes are identity-disjoint, as LFW's are. Where insightface scans a
fixed grid of distance thresholds, we take the exact best threshold on the training folds
(every cut between two distinct scores is tried), so the accuracy does not depend on a grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vigface.errors import VigfaceError


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
    issame = np.asarray(issame, dtype=bool)
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


def verify_scores(scores: np.ndarray, issame: np.ndarray, n_folds: int = 10) -> VerificationResult:
    """10-fold accuracy of similarity `scores` (higher = more alike) against `issame`."""
    scores = np.asarray(scores, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    if scores.shape != issame.shape or scores.ndim != 1:
        raise VigfaceError(
            f"verification: scores {scores.shape} and issame {issame.shape} must be equal 1-D shapes"
        )
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
