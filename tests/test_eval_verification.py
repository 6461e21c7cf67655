"""1:1 verification (10-fold, flipped-sum embeddings) against a pure-NumPy implementation written here."""

import numpy as np
import pytest
import torch

from vigface.data.images import encode_image
from vigface.data.verification_bin import write_bin
from vigface.errors import VigfaceError, VigfaceWarning
from vigface.eval.verification import (
    BENCHMARKS,
    gap_to_real,
    summarise,
    verify_bin,
    verify_bins,
    verify_embeddings,
    verify_scores,
)
from vigface.fr.backbone_config import BackboneConfig
from vigface.fr.iresnet import build_backbone


def numpy_ten_fold(scores, issame, n_folds=10):
    """The LFW protocol, written out: for each fold, try every cut of the other folds' sorted scores
    (below all, between each pair of distinct neighbours, above all), keep the most accurate cut
    (the highest one when several tie, as insightface's first-best distance does), score the fold."""
    scores = np.asarray(scores, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    n = len(scores)
    bounds = [0]
    for f in range(n_folds):  # contiguous folds, the first n % n_folds one pair longer
        bounds.append(bounds[-1] + n // n_folds + (1 if f < n % n_folds else 0))
    accs, thrs = [], []
    for f in range(n_folds):
        test = np.zeros(n, dtype=bool)
        test[bounds[f] : bounds[f + 1]] = True
        s, y = scores[~test], issame[~test]
        distinct = sorted(set(s.tolist()))
        cuts = [distinct[0] - 1.0]
        cuts += [(a + b) / 2 for a, b in zip(distinct[:-1], distinct[1:], strict=True)]
        cuts += [distinct[-1] + 1.0]
        best_acc, best_cut = -1.0, None
        for cut in cuts:
            acc = np.mean((s > cut) == y)
            if acc >= best_acc:  # >=: among equals the later (higher) cut wins
                best_acc, best_cut = acc, cut
        accs.append(float(np.mean((scores[test] > best_cut) == issame[test])))
        thrs.append(best_cut)
    return accs, thrs


def _score_sets():
    rng = np.random.default_rng(7)
    y = rng.random(600) < 0.5
    yield "ties", np.round(y * 0.7 + rng.normal(size=600), 1), y
    yield "heavy ties", rng.integers(0, 4, size=300).astype(float), rng.random(300) < 0.3
    yield "all same", rng.normal(size=200), np.ones(200, bool)
    yield "all different", rng.normal(size=200), np.zeros(200, bool)
    yield "all scores tied", np.full(120, 0.25), rng.random(120) < 0.4
    yield "odd count", rng.normal(size=203) + (rng.random(203) < 0.5), rng.random(203) < 0.5
    z = np.zeros(100, bool)
    z[:10] = True  # only the first fold holds positives: its training folds are all "different"
    yield "one-fold positives", rng.normal(size=100), z
    yield (
        "separable",
        np.r_[rng.uniform(0.6, 1, 50), rng.uniform(-1, 0.2, 50)],
        np.r_[np.ones(50), np.zeros(50)],
    )


@pytest.mark.parametrize("name,scores,issame", list(_score_sets()), ids=[s[0] for s in _score_sets()])
def test_ten_fold_equals_numpy_reference(name, scores, issame):
    result = verify_scores(scores, issame)
    accs, thrs = numpy_ten_fold(scores, issame)
    np.testing.assert_allclose(result.fold_accuracies, accs, rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.thresholds, thrs, rtol=0, atol=1e-9)
    assert result.accuracy == pytest.approx(np.mean(accs), abs=1e-12)
    assert result.std == pytest.approx(np.std(accs), abs=1e-12)


def test_known_answers():
    # All pairs "same": the cut below every score predicts all same on every fold.
    assert verify_scores(np.linspace(-1, 1, 50), np.ones(50, bool)).accuracy == 1.0
    # All scores tied: nothing can be separated; each fold gets the training majority (different).
    assert verify_scores(np.zeros(100), np.arange(100) % 4 == 0).accuracy == pytest.approx(0.75)


def _tiny_model():
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig("iresnet18", embedding_dim=16, width=4, input_size=16))
    with torch.no_grad():  # non-trivial running statistics so eval-mode BN is not the identity
        model.train()
        for _ in range(3):
            model(torch.randn(32, 3, 16, 16))
    return model.eval()


def test_verify_bin_is_flipped_sum_normalised_cosine(tmp_path):
    rng = np.random.default_rng(0)
    model = _tiny_model()
    # 100 pairs of 16x16 PNG images (lossless, so the reference sees the same pixels).
    base = rng.integers(0, 256, size=(60, 16, 16, 3), dtype=np.uint8)
    images, issame = [], []
    for p in range(100):
        a = base[p % 60]
        same = p % 2 == 0
        noise = rng.integers(-12, 13, size=a.shape)
        b = np.clip(a + noise, 0, 255).astype(np.uint8) if same else base[(p * 7 + 3) % 60]
        images += [a, b]
        issame.append(same)
    path = tmp_path / "toy_pairs.bin"
    write_bin(path, [encode_image(im, "png") for im in images], issame)

    # Reference: f(x) + f(mirror x), L2-normalised, cosine of consecutive rows, NumPy 10-fold.
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        e = (model(x) + model(x.flip(-1))).double().numpy()
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    scores = np.sum(e[0::2] * e[1::2], axis=1)
    accs, _ = numpy_ten_fold(scores, np.array(issame))

    result = verify_bin(model, path, batch_size=37)
    assert result.accuracy == pytest.approx(np.mean(accs), abs=1e-9)
    np.testing.assert_allclose(result.fold_accuracies, accs, atol=1e-9)
    # Without the flip the scores differ (the protocol really uses the mirror image).
    with torch.no_grad():
        e1 = model(x).double().numpy()
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    assert not np.allclose(np.sum(e1[0::2] * e1[1::2], axis=1), scores, atol=1e-4)

    both = verify_bins(model, [path])
    assert list(both) == ["toy_pairs"] and both["toy_pairs"].accuracy == result.accuracy
    with pytest.raises(VigfaceError, match="is given twice"):
        verify_bins(model, [path, path])
    # a set of genuine pairs only: every model scores 100 % (the threshold takes them all), said so
    genuine = tmp_path / "genuine.bin"
    write_bin(genuine, [encode_image(im, "png") for im in images[:40]], [True] * 20)
    with pytest.warns(VigfaceWarning, match="all its 20 pairs are genuine pairs; its accuracy says nothing"):
        assert verify_bin(model, genuine).accuracy == 1.0


def test_summary_average_and_gap_to_real():
    rng = np.random.default_rng(1)
    issame = np.arange(200) % 2 == 0
    results = {
        name: verify_scores(issame * (0.2 + 0.2 * k) + rng.normal(size=200), issame)
        for k, name in enumerate(BENCHMARKS)
    }
    table = summarise(results)
    accs = [100 * r.accuracy for r in results.values()]
    assert table["five_benchmark_average"] == pytest.approx(np.mean(accs))
    assert table["sets"]["lfw"]["std"] == pytest.approx(100 * results["lfw"].std)
    partial = summarise({"lfw": results["lfw"], "toy_val": results["calfw"]})
    assert partial["five_benchmark_average"] is None
    assert partial["average"] == pytest.approx((accs[0] + accs[4]) / 2)
    # The paper's Table 2: CASIA-WebFace 92.77 vs VIGFace(B) 89.78 -> GR 3.3 %, SynFace 68.10 -> 36.2 %.
    assert 100 * gap_to_real(92.77, 89.78) == pytest.approx(3.33, abs=0.01)
    assert 100 * gap_to_real(92.77, 68.10) == pytest.approx(36.2, abs=0.05)
    with pytest.raises(VigfaceError, match="positive"):
        gap_to_real(90.0, 0.0)


def test_bad_inputs():
    with pytest.raises(VigfaceError, match="folds"):
        verify_scores(np.zeros(5), np.ones(5, bool))
    with pytest.raises(VigfaceError, match="embeddings"):
        verify_embeddings(np.zeros((7, 4)), np.ones(4, bool))


def test_peer_rows_are_named_by_method_and_by_method_and_size():
    """DCFace, CemiFace and Arc2Face are listed at 0.5M and 1.2M images: the name alone took the 0.5M
    row and the 1.2M one could not be chosen."""
    from vigface.eval.peers import PEER_TABLE, peer_average

    dcface = [row for row in PEER_TABLE if row[0] == "DCFace"]
    assert [row[2].split()[0] for row in dcface] == ["0.5M", "1.2M"]
    assert peer_average("DCFace") == dcface[0][-1] == peer_average("DCFace 0.5M")
    assert peer_average("DCFace 1.2M") == dcface[1][-1] == 91.21
    assert peer_average("CASIA (Real)") == 94.93
    with pytest.raises(VigfaceError, match="add the size: 'DCFace 1.2M'"):
        peer_average("DCFace 2M")


def test_verify_bins_refuses_a_repeated_set_before_embedding_any(tmp_path, monkeypatch):
    """The same .bin under two spellings was refused as 'two .bin files are named ... rename one',
    and only after the sets before it had been embedded."""
    import vigface.eval.verification as verification

    embedded = []
    monkeypatch.setattr(verification, "verify_bin", lambda model, path, **kw: embedded.append(path))
    (tmp_path / "a").mkdir()
    for folder in (tmp_path, tmp_path / "a"):
        (folder / "lfw.bin").write_bytes(b"")
    with pytest.raises(VigfaceError, match=r"lfw.bin is given twice; give each set once"):
        verification.verify_bins(None, [tmp_path / "x.bin", tmp_path / "lfw.bin", f"{tmp_path}/a/../lfw.bin"])
    with pytest.raises(VigfaceError, match=r"are both named 'lfw'; rename one"):
        verification.verify_bins(None, [tmp_path / "lfw.bin", tmp_path / "a" / "lfw.bin"])
    assert embedded == []
    verification.verify_bins(None, [tmp_path / "lfw.bin", tmp_path / "x.bin"])
    assert embedded == [str(tmp_path / "lfw.bin"), str(tmp_path / "x.bin")]
