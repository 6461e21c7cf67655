"""`vigface data pairs`: a verification .bin from your own aligned images, checked by hand."""

import numpy as np
import pytest

from vigface.cli.main import main
from vigface.data.image_folder import write_image_folder
from vigface.data.images import encode_image
from vigface.data.pairs import make_pairs_bin
from vigface.data.verification_bin import read_bin
from vigface.errors import VigfaceError, VigfaceWarning


def _folder(path, ids: int, per_id: int):
    """ids x per_id distinct PNGs; image bytes -> identity, to check every pair by hand."""
    images, labels, owner = [], [], {}
    for a in range(ids):
        for k in range(per_id):
            pixels = np.random.default_rng([a, k]).integers(0, 256, (8, 8, 3), dtype=np.uint8)
            images.append(pixels)
            labels.append(a)
            owner[encode_image(pixels, "png")] = a
    write_image_folder(path, images, labels, fmt="png")
    return owner


def test_pairs_are_labelled_right_and_folds_share_no_identity(tmp_path):
    owner = _folder(tmp_path / "held_out", ids=25, per_id=3)
    # 2-3 identities x 3 images per fold hold fewer than its 10 genuine pairs: some repeat, and it says so
    with pytest.warns(VigfaceWarning, match=r"of the 200 pairs repeat another"):
        summary = make_pairs_bin(tmp_path / "held_out", tmp_path / "val.bin", pairs=200, seed=1)
    assert (summary["pairs"], summary["identities"]) == (200, 25)
    images, issame = read_bin(tmp_path / "val.bin")
    drawn = [tuple(sorted((bytes(images[2 * p]), bytes(images[2 * p + 1])))) for p in range(200)]
    assert summary["repeated"] == 200 - len(set(drawn)) > 0
    assert len(issame) == 200 and issame.sum() == 100
    who = [owner[bytes(b)] for b in images]
    for p, same in enumerate(issame):  # each flag says whether the two images show one identity
        assert (who[2 * p] == who[2 * p + 1]) == bool(same)
        assert not same or images[2 * p] != images[2 * p + 1]  # never an image with itself
    folds = [set(who[40 * f : 40 * (f + 1)]) for f in range(10)]  # 20 pairs = 40 images per fold
    assert all(not (folds[f] & folds[g]) for f in range(10) for g in range(f))
    assert [issame[20 * f : 20 * (f + 1)].sum() for f in range(10)] == [10] * 10
    with pytest.warns(VigfaceWarning):
        again = make_pairs_bin(tmp_path / "held_out", tmp_path / "again.bin", pairs=200, seed=1)
    assert again == summary and (tmp_path / "again.bin").read_bytes() == (tmp_path / "val.bin").read_bytes()


def test_bad_requests_are_one_line_errors(tmp_path, capsys):
    _folder(tmp_path / "small", ids=12, per_id=2)
    with pytest.raises(VigfaceError, match="12 identities have 2 or more images; 10 identity-disjoint folds"):
        make_pairs_bin(tmp_path / "small", tmp_path / "x.bin", pairs=200)
    with pytest.raises(VigfaceError, match="multiple of 20"):
        make_pairs_bin(tmp_path / "small", tmp_path / "x.bin", pairs=30)
    with pytest.raises(VigfaceError, match="must end in .bin"):
        make_pairs_bin(tmp_path / "small", tmp_path / "x.rec", pairs=200)
    with pytest.raises(VigfaceError, match="--seed must be >= 0"):
        make_pairs_bin(tmp_path / "small", tmp_path / "x.bin", pairs=200, seed=-3)
    (tmp_path / "d.bin").mkdir()
    with pytest.raises(VigfaceError, match="is a folder"):
        make_pairs_bin(tmp_path / "small", tmp_path / "d.bin", pairs=200, overwrite=True)
    _folder(tmp_path / "ok", ids=20, per_id=2)
    assert (
        main(["data", "pairs", str(tmp_path / "ok"), "--out", str(tmp_path / "v.bin"), "--pairs", "40"]) == 0
    )
    assert "wrote 40 pairs" in capsys.readouterr().out
    assert (
        main(["data", "pairs", str(tmp_path / "ok"), "--out", str(tmp_path / "v.bin"), "--pairs", "40"]) == 2
    )
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert not list(tmp_path.glob("x.*"))


def test_far_more_pairs_than_a_fold_holds_are_refused_at_once(tmp_path):
    """--pairs 10**9 on a small set ran for hours drawing mostly the same pairs again."""
    _folder(tmp_path / "held_out", ids=25, per_id=3)  # 2-3 identities x 3 pairs: 6 per smallest fold
    with pytest.raises(VigfaceError, match=r"holds only 6 distinct genuine pairs, .* ask for at most 1,200"):
        make_pairs_bin(tmp_path / "held_out", tmp_path / "val.bin", pairs=10**9)
    assert not (tmp_path / "val.bin").exists()
    with pytest.warns(VigfaceWarning, match="repeat another"):  # up to 10 times over: warned, written
        make_pairs_bin(tmp_path / "held_out", tmp_path / "val.bin", pairs=1200)


@pytest.mark.filterwarnings("ignore:.*pairs repeat another")  # 2 images per id: every image is used
def test_an_image_that_does_not_decode_is_named_before_the_bin_is_written(tmp_path):
    """pairs copied payloads without decoding them: a truncated JPEG went into the .bin (exit 0),
    and only verification refused it, later."""
    _folder(tmp_path / "held_out", ids=20, per_id=2)
    first = sorted((tmp_path / "held_out").rglob("*.png"))[0]
    first.write_bytes(first.read_bytes()[:40])  # a PNG cut inside its header
    with pytest.raises(
        VigfaceError, match=rf"held_out: image {first.parent.name}/{first.name} .* not a decodable"
    ):
        make_pairs_bin(tmp_path / "held_out", tmp_path / "val.bin", pairs=40)
    assert not (tmp_path / "val.bin").exists()
