"""10-fold verification against a brute-force reference written here."""

import numpy as np
import pytest

from vigface.errors import VigfaceError
from vigface.eval.verification import best_threshold, verify_embeddings, verify_scores


def _brute_best_accuracy(scores, issame):
    """Try every threshold between (and beyond) the sorted distinct scores."""
    u = np.unique(scores)
    cands = np.concatenate([[u[0] - 1], (u[:-1] + u[1:]) / 2, [u[-1] + 1]])
    return max(np.mean((scores > t) == issame) for t in cands)


def _brute_10fold(scores, issame, n_folds=10):
    accs = []
    for test in np.array_split(np.arange(len(scores)), n_folds):
        train = np.setdiff1d(np.arange(len(scores)), test)
        s, y = scores[train], issame[train]
        u = np.unique(s)
        cands = np.concatenate([[u[0] - 1], (u[:-1] + u[1:]) / 2, [u[-1] + 1]])
        acc = np.array([np.mean((s > t) == y) for t in cands])
        t = cands[np.flatnonzero(acc == acc.max())[-1]]  # ties -> highest threshold
        accs.append(np.mean((scores[test] > t) == issame[test]))
    return float(np.mean(accs))


@pytest.mark.parametrize("seed", range(5))
def test_best_threshold_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.normal(size=200), 1)  # rounding makes many ties
    issame = rng.random(200) < 0.5
    _, acc = best_threshold(scores, issame)
    assert acc == pytest.approx(_brute_best_accuracy(scores, issame))


@pytest.mark.parametrize("seed", range(5))
def test_ten_fold_matches_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    issame = rng.random(600) < 0.5
    scores = np.round(issame * 0.8 + rng.normal(size=600), 2)
    assert verify_scores(scores, issame).accuracy == pytest.approx(_brute_10fold(scores, issame))


def test_all_same_labels_and_perfect_separation():
    scores = np.linspace(0, 1, 100)
    assert verify_scores(scores, np.ones(100, bool)).accuracy == 1.0
    assert verify_scores(scores, np.zeros(100, bool)).accuracy == 1.0
    rng = np.random.default_rng(0)
    issame = rng.random(100) < 0.5
    separable = issame + rng.uniform(0, 0.4, 100)  # a gap of 0.6 between the classes
    assert verify_scores(separable, issame).accuracy == 1.0
    # All scores tied: no threshold can separate anything, accuracy = majority rate per fold.
    r = verify_scores(np.zeros(100), np.arange(100) % 4 == 0)
    assert r.accuracy == pytest.approx(0.75)


def test_embeddings_pairs_are_consecutive_rows():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 8))
    issame = np.arange(50) % 2 == 0
    b = np.where(issame[:, None], a + 0.01 * rng.normal(size=a.shape), rng.normal(size=a.shape))
    emb = np.empty((100, 8))
    emb[0::2], emb[1::2] = a, b
    assert verify_embeddings(emb, issame).accuracy == 1.0
    with pytest.raises(VigfaceError, match="embeddings"):
        verify_embeddings(emb[:-1], issame)
    with pytest.raises(VigfaceError, match="NaN"):
        verify_scores(np.full(20, np.nan), np.ones(20, bool))
