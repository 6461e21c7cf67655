"""Warnings when a dataset's landmarks say its faces are not aligned (they ran silently before)."""

import json
import warnings

import numpy as np
import pytest

from vigface.cli import train_fr as train_fr_cli
from vigface.data.align import ARCFACE_TEMPLATE_112
from vigface.data.alignment_check import check_dataset_alignment, template_distance, warn_if_not_aligned
from vigface.data.toy_dataset import ToyConfig, make_toy_dataset
from vigface.errors import VigfaceWarning


@pytest.fixture(scope="module")
def unaligned_toy(tmp_path_factory):
    """The toy world's 144x144 unaligned photos (faces placed, scaled and turned at random)."""
    out = tmp_path_factory.mktemp("unaligned_toy")
    make_toy_dataset(
        out, ToyConfig(ids=20, per_id=2, pairs=0, val_ids=2, unaligned=True), workers=1, progress=False
    )
    return out


def test_template_distance_by_hand():
    template = np.asarray(ARCFACE_TEMPLATE_112, dtype=np.float64)
    assert template_distance(template[None], 112) == 0.0
    shifted = np.stack([template + [3.0, 4.0], template - [6.0, 8.0], template + [30.0, 40.0]])
    assert template_distance(shifted, 112) == pytest.approx(10.0)  # per image 5, 10, 50: the median
    assert template_distance(template[None] * 2, 224) == pytest.approx(
        0.0
    )  # the template scales with the side
    assert template_distance(np.full((2, 5, 2), np.nan), 112) is None


def test_warns_only_past_the_limit():
    template = np.asarray(ARCFACE_TEMPLATE_112)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_not_aligned(np.stack([template + [3.0, 4.0]] * 4), 112, "near")  # 5 px: 4.5 %
    with pytest.warns(VigfaceWarning, match=r"far: .* 10\.0 px, 9 % of the side"):
        assert warn_if_not_aligned(np.stack([template + [6.0, 8.0]] * 4), 112, "far")


def test_datasets_are_checked_by_their_stored_landmarks(small_toy, unaligned_toy):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not check_dataset_alignment(small_toy, "--data")  # the aligned toy set: ~3 %
    with pytest.warns(VigfaceWarning, match="do not look like aligned faces in a 144x144 frame"):
        assert check_dataset_alignment(unaligned_toy / "train.rec", "--data")


def test_train_fr_on_unaligned_photos_warns_in_one_line(unaligned_toy, tmp_path, capsys):
    args = ["--data", str(unaligned_toy), "--out", str(tmp_path / "fr"), "--arch", "iresnet18",
            "--width", "8", "--input-size", "32", "--embedding-dim", "16", "--batch-size", "8",
            "--max-steps", "1", "--workers", "0", "--no-progress", "--lr-steps", "0.5"]  # fmt: skip
    assert train_fr_cli.main(args) == 0
    err = capsys.readouterr().err
    assert (
        f"vigface-train-fr: warning: --data {unaligned_toy}: these landmarks do not look like aligned" in err
    )


def test_train_fr_aligns_unaligned_photos_on_the_fly(unaligned_toy, tmp_path, capsys, monkeypatch):
    """--no-aligned: the loader warps each photo with its landmarks (beside the .rec) to the template;
    it was reachable only from Python (make_loader(aligned=False)). No alignment warning then."""
    import vigface.fr.trainer as trainer

    seen = {}
    real_make_loader = trainer.make_loader

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_make_loader(*args, **kwargs)

    monkeypatch.setattr(trainer, "make_loader", spy)
    args = ["--data", str(unaligned_toy), "--out", str(tmp_path / "fr"), "--arch", "iresnet18",
            "--width", "8", "--input-size", "32", "--embedding-dim", "16", "--batch-size", "8",
            "--max-steps", "2", "--workers", "0", "--no-progress", "--lr-steps", "0.5",
            "--no-aligned"]  # fmt: skip
    assert train_fr_cli.main(args) == 0
    assert seen["aligned"] is False and seen["landmarks"] is None and seen["image_size"] == 32
    assert "warning" not in capsys.readouterr().err
    config = json.loads((tmp_path / "fr" / "config.json").read_text())
    assert config["aligned"] is False


def test_landmarks_without_no_aligned_are_refused(small_toy, tmp_path, capsys):
    """--landmarks was ignored silently for aligned data (it is read only when aligning on the fly)."""
    args = ["--data", str(small_toy), "--out", str(tmp_path / "fr"), "--landmarks", str(small_toy / "x.npy")]
    assert train_fr_cli.main(args) == 2
    assert "landmarks (--landmarks) is read only with --no-aligned" in capsys.readouterr().err
    assert not (tmp_path / "fr").exists()


def test_embed_of_unaligned_photos_warns_in_one_line(
    unaligned_toy, small_toy, tiny_fr_model, tmp_path, capsys
):
    """vigface-embed embedded unaligned photos without a word (the trainers and eval warned)."""
    from vigface.cli import embed as embed_cli

    assert (
        embed_cli.main([str(tiny_fr_model), str(unaligned_toy), "--out", str(tmp_path / "u.npy"), "--quiet"])
        == 0
    )
    err = capsys.readouterr().err
    assert f"vigface-embed: warning: INPUT {unaligned_toy}: these landmarks do not look like aligned" in err
    assert (
        embed_cli.main([str(tiny_fr_model), str(small_toy), "--out", str(tmp_path / "a.npy"), "--quiet"]) == 0
    )
    assert "warning" not in capsys.readouterr().err
