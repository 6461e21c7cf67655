"""CST / DIV / SEP (paper eqs. 10-14), SER-FIQ quality and histogram IoU on hand-made inputs."""

import itertools

import numpy as np
import pytest
import torch

from vigface.errors import VigfaceError
from vigface.eval.metrics import class_consistency, class_diversity, class_separability, dataset_metrics
from vigface.eval.serfiq import _trunk_and_head, serfiq_quality, serfiq_scores
from vigface.eval.similarity import distribution_iou, genuine_imposter, histogram_iou, mean_genuine_imposter
from vigface.fr.backbone_config import BackboneConfig
from vigface.fr.iresnet import build_backbone

# ---- CST (eq. 10) -------------------------------------------------------------------------------


def test_consistency_known_answers():
    e = np.array(
        [
            [1, 0, 0], [0, 1, 0],             # class 0: two orthogonal images -> (1 + 1 + 0 + 0) / 4
            [2, 0, 0], [5, 0, 0], [0.1, 0, 0],  # class 1: one direction, any norm -> 1
            [0, 0, 1], [0, 0, -3],            # class 2: opposite images -> 0
            [0, 3, 4],                        # class 3: a single image -> 1
        ],
        dtype=float,
    )  # fmt: skip
    labels = np.array([10, 10, 11, 11, 11, 12, 12, 13])
    classes, cst = class_consistency(e, labels)
    assert classes.tolist() == [10, 11, 12, 13]
    np.testing.assert_allclose(cst, [0.5, 1.0, 0.0, 1.0], atol=1e-12)


def test_consistency_is_the_double_sum_of_eq10():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(30, 8))
    labels = rng.integers(0, 4, size=30)
    _, cst = class_consistency(e, labels)
    for k, c in enumerate(np.unique(labels)):
        f = e[labels == c]
        n = len(f)
        total = sum(
            f[i] @ f[j] / (np.linalg.norm(f[i]) * np.linalg.norm(f[j])) for i in range(n) for j in range(n)
        )
        assert cst[k] == pytest.approx(total / n**2)


# ---- SEP (eqs. 13-14) ---------------------------------------------------------------------------


def test_separability_known_answers():
    # Centres e1, (0.6, 0.8, 0), (0, 0.6, 0.8): cos(c0, c1) = 0.6, cos(c1, c2) = 0.48, cos(c0, c2) = 0.
    e = np.array([[1, 0, 0], [2, 0, 0], [0.6, 0.8, 0], [3, 4, 0], [0, 0.6, 0.8], [0, 0.6, 0.8]], float)
    labels = np.array([0, 0, 1, 1, 2, 2])
    sep = class_separability(e, labels)
    np.testing.assert_allclose(sep["ccs"], [1, 1, 1])
    np.testing.assert_allclose(sep["nnccs"], [0.6, 0.6, 0.48])
    np.testing.assert_allclose(sep["sep"], [1 / 0.6, 1 / 0.6, 1 / 0.48])


def test_separability_matches_a_loop_over_eq13_14():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(5, 16))
    labels = np.repeat(np.arange(5), 6)
    e = centres[labels] + 0.8 * rng.normal(size=(30, 16))
    sep = class_separability(e, labels)
    u = e / np.linalg.norm(e, axis=1, keepdims=True)
    mean = {k: u[labels == k].mean(0) for k in range(5)}
    for k in range(5):
        ratios = []
        for i in np.flatnonzero(labels == k):
            cos = {j: u[i] @ mean[j] / np.linalg.norm(mean[j]) for j in range(5)}
            ratios.append(cos[k] / max(cos[j] for j in range(5) if j != k))
        assert sep["sep"][k] == pytest.approx(np.mean(ratios))
    with pytest.raises(VigfaceError, match="two classes"):
        class_separability(e[:6], labels[:6])


# ---- DIV (eqs. 11-12) and SER-FIQ ---------------------------------------------------------------


def test_diversity_is_the_population_variance_per_class():
    q = np.array([0.5, 0.5, 0.5, 0.0, 1.0, 0.2, 0.4, 0.9])
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    classes, div = class_diversity(q, labels)
    np.testing.assert_allclose(div, [0.0, 0.25, np.var([0.2, 0.4, 0.9])])


def test_serfiq_identical_passes_give_maximal_quality():
    rng = np.random.default_rng(2)
    one = rng.normal(size=(4, 1, 32))
    q = serfiq_quality(np.repeat(one, 10, axis=1) * rng.uniform(0.5, 2, size=(4, 10, 1)))  # norms differ only
    np.testing.assert_allclose(q, 1.0, atol=1e-7)
    # Two orthogonal passes: sum_{i<j} d = sqrt(2), q = 2 sigmoid(-(2 / 2^2) sqrt(2)).
    q2 = serfiq_quality(np.array([[[1.0, 0.0], [0.0, 1.0]]]))
    assert q2[0] == pytest.approx(2 / (1 + np.exp(np.sqrt(2) / 2)))
    # More disagreement between the passes -> lower quality, always in (0, 1].
    qs = [serfiq_quality(one + s * rng.normal(size=(4, 10, 32)))[0] for s in (0.01, 0.1, 0.5, 2.0)]
    assert all(a > b for a, b in itertools.pairwise(qs)) and 0 < qs[-1] < 1
    with pytest.raises(VigfaceError, match="m >= 2"):
        serfiq_quality(one)


def _model(dropout=None):
    torch.manual_seed(0)
    model = build_backbone(
        BackboneConfig("iresnet18", embedding_dim=16, width=4, input_size=16, dropout=dropout)
    )
    with torch.no_grad():
        model.train()
        model(torch.randn(16, 3, 16, 16))
    return model.eval()


def test_serfiq_scores_on_a_backbone():
    model = _model()
    x = torch.randn(5, 3, 16, 16)
    trunk, head = _trunk_and_head(model)
    with torch.no_grad():  # without dropout the split network is the model itself
        torch.testing.assert_close(head(trunk(x)), model(x))
    images = np.random.default_rng(0).integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8)
    q = serfiq_scores(model, images, passes=20, batch_size=5, seed=3)
    assert q.shape == (12,) and np.all((q > 0) & (q <= 1))
    np.testing.assert_array_equal(q, serfiq_scores(model, images, passes=20, batch_size=12, seed=3))
    # A vanishing dropout rate makes the passes identical: maximal quality.
    np.testing.assert_allclose(serfiq_scores(model, images, passes=5, dropout=1e-9), 1.0, atol=1e-6)
    # More dropout spreads the passes: lower quality for every image.
    assert np.all(
        serfiq_scores(model, images, passes=20, dropout=0.7)
        < serfiq_scores(model, images, passes=20, dropout=0.1)
    )
    assert not model.training
    with pytest.raises(VigfaceError, match="dropout"):
        serfiq_scores(model, images, dropout=1.0)
    with pytest.raises(VigfaceError, match="IResNet"):
        serfiq_scores(torch.nn.Linear(3, 3), images)
    # Many passes: the batch shrinks to hold their features (10**8 passes asked torch for 200 GB),
    # and the scores are the ones a per-image run gives (to the rounding of the head's matmul blocks).
    many = serfiq_scores(model, images[:3], passes=3000, batch_size=128, seed=3)
    one_by_one = serfiq_scores(model, images[:3], passes=3000, batch_size=1, seed=3)
    np.testing.assert_allclose(many, one_by_one, rtol=1e-6)
    with pytest.raises(VigfaceError, match="passes must be in 2..10,000, got 100,000,000"):
        serfiq_scores(model, images, passes=10**8)


def test_dataset_metrics_summary():
    e = np.array([[1, 0, 0], [2, 0, 0], [0.6, 0.8, 0], [3, 4, 0], [0, 0.6, 0.8], [0, 0.6, 0.8]], float)
    labels = np.array([0, 0, 1, 1, 2, 2])
    m = dataset_metrics(e, labels, quality=np.array([1, 1, 0, 1, 0.5, 0.5]))
    assert m["cst"] == pytest.approx(1.0) and m["classes"] == 3 and m["images"] == 6
    assert m["div"] == pytest.approx(0.25 / 3)
    assert m["sep"] == pytest.approx((2 / 0.6 + 1 / 0.48) / 3)


# ---- similarity distributions and IoU (Table 1) -------------------------------------------------


def test_histogram_iou_known_answers():
    a = np.linspace(0.0, 0.1, 1000, endpoint=False) + 1e-6  # uniform over bins [0, 0.1) of width 0.02
    b = a + 0.05  # half of it overlaps
    assert histogram_iou(a, a) == 1.0
    assert histogram_iou(a, a + 0.5) == 0.0
    assert histogram_iou(a, b) == pytest.approx(1 / 3)  # min-sum 0.5 / max-sum 1.5
    assert histogram_iou(a, b) == histogram_iou(b, a)
    row = distribution_iou((a, a), (a, b))
    assert row == pytest.approx({"genuine": 1.0, "imposter": 1 / 3, "average": 2 / 3})


def test_genuine_imposter_enumerates_every_pair():
    rng = np.random.default_rng(3)
    e = rng.normal(size=(20, 6))
    labels = rng.integers(0, 4, size=20)
    genuine, imposter = genuine_imposter(e, labels)
    u = e / np.linalg.norm(e, axis=1, keepdims=True)
    pairs = list(itertools.combinations(range(20), 2))
    ref_g = sorted(u[i] @ u[j] for i, j in pairs if labels[i] == labels[j])
    ref_i = sorted(u[i] @ u[j] for i, j in pairs if labels[i] != labels[j])
    np.testing.assert_allclose(np.sort(genuine), ref_g)
    np.testing.assert_allclose(np.sort(imposter), ref_i)
    np.testing.assert_allclose(mean_genuine_imposter(e, labels), (np.mean(ref_g), np.mean(ref_i)))
    # Sampled when there are more pairs than max_pairs: the right count, drawn from the right kind.
    g, i = genuine_imposter(e, labels, max_pairs=15, seed=1)
    assert len(g) == 15 and len(i) == 15
    assert set(np.round(g, 12)) <= set(np.round(ref_g, 12))
    assert set(np.round(i, 12)) <= set(np.round(ref_i, 12))


def test_histogram_iou_compares_frequencies_not_counts():
    a = np.linspace(-0.5, 0.5, 300)
    assert histogram_iou(a, np.concatenate([a, a, a])) == pytest.approx(1.0)  # 3x the pairs, same shape
    # 300 values against 900 of which a third lie elsewhere: overlap 2/3 of the frequency mass.
    b = np.concatenate([a, a, a + 3.0])  # + 3 lands in the last bin (clipped to 1.0)
    p = np.histogram(np.clip(a, -1, 1), bins=100, range=(-1, 1))[0] / 300
    q = np.histogram(np.clip(b, -1, 1), bins=100, range=(-1, 1))[0] / 900
    assert histogram_iou(a, b) == pytest.approx(np.minimum(p, q).sum() / np.maximum(p, q).sum())


def test_similarity_refuses_non_finite_values():
    e = np.random.default_rng(0).normal(size=(12, 4))
    e[3, 1] = np.nan
    with pytest.raises(VigfaceError, match="NaN or inf"):
        genuine_imposter(e, np.arange(12) // 3)
    with pytest.raises(VigfaceError, match="NaN"):
        histogram_iou(np.array([0.1, np.nan, 0.3]), np.array([0.1, 0.2]))


def test_genuine_imposter_accepts_any_label_type():
    e = np.random.default_rng(1).normal(size=(15, 5))
    ints = np.array([2, 0, 1, 2, 0, 1, 1, 2, 0, 0, 2, 1, 0, 1, 2])
    names = np.array(["carol", "ann", "bob"])[ints]  # the same grouping under string labels
    for got, want in zip(genuine_imposter(e, names), genuine_imposter(e, ints), strict=True):
        np.testing.assert_array_equal(np.sort(got), np.sort(want))


def test_sampled_genuine_pairs_are_the_enumerated_lists_draw():
    """Drawn by rank without listing every pair: the same pairs as listing them all, then drawing."""
    rng = np.random.default_rng(5)
    e = rng.normal(size=(90, 4))
    labels = rng.integers(0, 6, size=90)
    u = e / np.linalg.norm(e, axis=1, keepdims=True)
    listed = [
        (i, j) for c in np.unique(labels) for i, j in itertools.combinations(np.flatnonzero(labels == c), 2)
    ]
    pick = np.random.default_rng(7).choice(len(listed), size=40, replace=False)  # the old draw, seed 7
    want = [u[listed[p][0]] @ u[listed[p][1]] for p in pick]
    got, _ = genuine_imposter(e, labels, max_pairs=40, seed=7)
    np.testing.assert_allclose(got, want)


def test_a_huge_class_is_sampled_without_listing_its_pairs():
    n = 30_000  # 450 M pairs: listing them would take ~7 GB of indices
    labels = np.r_[np.zeros(n, dtype=np.int64), np.ones(20, dtype=np.int64)]
    e = np.random.default_rng(0).normal(size=(n + 20, 3))
    genuine, imposter = genuine_imposter(e, labels, max_pairs=1000)
    assert len(genuine) == len(imposter) == 1000 and np.all(np.abs(genuine) <= 1 + 1e-12)
    # Few imposter pairs (one class and a single other image): all of them, found class pair by
    # class pair; each is that image against one of the class's.
    genuine, imposter = genuine_imposter(e[: n + 1], labels[: n + 1], max_pairs=50_000)
    u = e[: n + 1] / np.linalg.norm(e[: n + 1], axis=1, keepdims=True)
    np.testing.assert_allclose(imposter, u[:n] @ u[n])
