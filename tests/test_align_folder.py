"""`vigface data align`: unaligned toy images + landmarks -> aligned folder / RecordIO."""

import json
import shutil

import numpy as np
import pytest

from vigface.cli.main import main
from vigface.data.align import align_faces
from vigface.data.align_folder import align_image_folder
from vigface.data.image_folder import ImageFolderDataset, write_image_folder
from vigface.data.recordio import FaceRecordDataset
from vigface.data.toyfaces import render_wild
from vigface.errors import VigfaceError, VigfaceWarning


@pytest.fixture(scope="module")
def wild_folder(tmp_path_factory):
    """Six unaligned 144x144 toy faces of 3 identities, PNG (lossless), landmarks in the manifest."""
    root = tmp_path_factory.mktemp("wild")
    rendered = [render_wild(9, ident, k) for ident in (2, 0, 1) for k in range(2)]
    write_image_folder(
        root, [r[0] for r in rendered], [2, 2, 0, 0, 1, 1], landmarks=[r[1] for r in rendered], fmt="png"
    )
    return root, rendered


def test_align_folder_matches_align_faces(wild_folder, tmp_path):
    root, rendered = wild_folder
    summary = align_image_folder(root, tmp_path / "out", image_format="png", progress=False)
    assert summary == {"images": 6, "skipped": 0, "identities": 3}
    out = ImageFolderDataset(tmp_path / "out")
    src = ImageFolderDataset(root)
    for i in range(6):
        j = i  # the folder output keeps the input order
        assert out.paths[i].split(".")[0] == src.paths[j].split(".")[0]
        expected, _ = align_faces(src[j][0], src.landmarks[j])
        got, label = out[i]
        assert label == src.labels[j]
        np.testing.assert_array_equal(got, expected)  # PNG: lossless, so bit-identical
    # Aligned landmarks land near the ArcFace template.
    assert (
        np.abs(
            out.landmarks.mean(0) - [[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]]
        ).max()
        < 8
    )


def test_align_to_rec_groups_identities_and_writes_landmarks(wild_folder, tmp_path):
    root, _ = wild_folder
    jsonl = tmp_path / "lm.jsonl"
    src = ImageFolderDataset(root)
    jsonl.write_text(
        "".join(
            json.dumps({"path": p, "landmarks": lm.tolist()}) + "\n"
            for p, lm in zip(src.paths, src.landmarks, strict=True)
        )
    )
    assert (
        main(
            [
                "data",
                "align",
                "--images",
                str(root),
                "--landmarks",
                str(jsonl),
                "--out",
                str(tmp_path / "a.rec"),
                "--format",
                "rec",
                "--quiet",
            ]
        )
        == 0
    )
    ds = FaceRecordDataset(tmp_path / "a.rec")
    assert sorted(ds.labels.tolist()) == ds.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert np.load(tmp_path / "a_landmarks.npy").shape == (6, 5, 2)
    # the identity name of each label (folder names), which a .rec cannot hold
    names = json.loads((tmp_path / "a_identities.json").read_text())
    assert names == {"0": "000000", "1": "000001", "2": "000002"}  # write_image_folder's folder names


def test_info_on_folder(wild_folder, capsys):
    root, _ = wild_folder
    assert main(["data", "info", str(root), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "image-folder" and info["images"] == 6 and info["identities"] == 3
    assert info["landmarks"] is True and info["image_shape"] == [144, 144, 3]


def test_bad_landmarks_name_the_file(wild_folder, tmp_path, capsys):
    root, _ = wild_folder
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((3, 5, 2), np.float32))
    wrong_rows = r"bad.npy: has shape \(3, 5, 2\), expected \(6, 5, 2\) landmarks for the 6"
    with pytest.raises(VigfaceError, match=wrong_rows):
        align_image_folder(root, tmp_path / "o1", landmarks=bad, progress=False)
    same = tmp_path / "same.npy"
    np.save(same, np.ones((6, 5, 2), np.float32))  # every point equal: no similarity exists
    assert (
        main(
            [
                "data",
                "align",
                "--images",
                str(root),
                "--landmarks",
                str(same),
                "--out",
                str(tmp_path / "o2"),
                "--quiet",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("vigface: error:") and "landmarks" in err
    # a folder without a manifest carries no landmarks (it said "its manifest has no landmarks")
    scanned = tmp_path / "scanned"
    for path in ImageFolderDataset(root).paths:
        (scanned / path).parent.mkdir(parents=True, exist_ok=True)
        (scanned / path).write_bytes((root / path).read_bytes())
    with pytest.raises(
        VigfaceError, match=r"scanned: no manifest.jsonl \(a folder of <identity>/ images carries"
    ):
        align_image_folder(scanned, tmp_path / "o3", progress=False)


def test_existing_outputs_need_overwrite_and_foreign_folders_are_refused(wild_folder, tmp_path, capsys):
    root, _ = wild_folder

    def align(*extra):
        return main(["data", "align", "--images", str(root), "--quiet", *extra])

    # Folder output: a second run needs --overwrite (the flag the message names), then replaces it.
    assert align("--out", str(tmp_path / "f")) == 0
    assert align("--out", str(tmp_path / "f")) == 2
    assert "manifest.jsonl: already exists; pass --overwrite" in capsys.readouterr().err
    assert align("--out", str(tmp_path / "f"), "--overwrite") == 0
    assert len(ImageFolderDataset(tmp_path / "f")) == 6
    # RecordIO output, as a .rec path and as a folder.
    for out in (tmp_path / "a.rec", tmp_path / "r"):
        assert align("--out", str(out), "--format", "rec") == 0
        rec = out if out.suffix == ".rec" else out / "train.rec"
        before = rec.read_bytes()
        assert align("--out", str(out), "--format", "rec") == 2
        assert f"{rec}: already exists; pass --overwrite" in capsys.readouterr().err
        assert rec.read_bytes() == before
        assert align("--out", str(out), "--format", "rec", "--overwrite") == 0
    # An --out ending in .rec is a RecordIO without --format (it was an image folder named a.rec) ...
    assert align("--out", str(tmp_path / "b.rec")) == 0
    assert len(FaceRecordDataset(tmp_path / "b.rec")) == 6
    # ... and an image folder with that name is refused.
    assert align("--out", str(tmp_path / "c.rec"), "--format", "folder") == 2
    assert "an image folder named *.rec would pass for a RecordIO file" in capsys.readouterr().err
    assert not (tmp_path / "c.rec").exists()
    # A folder holding another dataset: refused for both formats, even with --overwrite for rec.
    other = tmp_path / "other"
    other.mkdir()
    (other / "toy.json").write_text("{}")
    assert align("--out", str(other), "--format", "rec", "--overwrite") == 2
    assert "holds toy.json, which align does not write" in capsys.readouterr().err
    assert align("--out", str(other)) == 2
    assert "not empty and holds no manifest.jsonl" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["toy.json"]


def test_a_rec_with_its_landmarks_aligns_like_the_folder_route(tmp_path, capsys):
    """`vigface data toy --unaligned` writes a .rec + train_landmarks.npy, which align refused ("not a
    directory"); it now reads them, with the same result per image as align_faces."""
    from vigface.data.alignment_check import template_distance
    from vigface.data.toy_dataset import ToyConfig, make_toy_dataset

    raw = tmp_path / "raw"
    config = ToyConfig(ids=3, per_id=2, pairs=0, val_ids=2, unaligned=True)
    make_toy_dataset(raw, config, workers=1, progress=False)
    args = ["data", "align", "--images", str(raw), "--out", str(tmp_path / "a.rec"), "--image-format", "png"]
    assert main([*args, "--quiet"]) == 0
    src, out = FaceRecordDataset(raw / "train.rec"), FaceRecordDataset(tmp_path / "a.rec")
    table = np.load(raw / "train_landmarks.npy")
    assert len(out) == 6 and out.labels.tolist() == src.labels.tolist()
    for i in range(6):
        expected, _ = align_faces(src[i][0], table[i])
        np.testing.assert_array_equal(out[i][0], expected)
    assert template_distance(np.load(tmp_path / "a_landmarks.npy"), 112) < 0.05 * 112
    assert json.loads((tmp_path / "a_identities.json").read_text()) == {
        "0": "000000",
        "1": "000001",
        "2": "000002",
    }
    # the input itself is never the output (it replaced raw/train.rec with aligned faces, toy.json intact)
    before = (raw / "train.rec").read_bytes()
    for out in (raw / "train.rec", raw):
        own = ["data", "align", "--images", str(raw), "--out", str(out), "--format", "rec", "--overwrite"]
        assert main([*own, "--quiet"]) == 2
        assert "writes over the input" in capsys.readouterr().err
    assert (raw / "train.rec").read_bytes() == before
    # a damaged identities table beside the input is one line
    (raw / "train_identities.json").write_text("[1, 2]")
    assert main(["data", "align", "--images", str(raw), "--out", str(tmp_path / "c.rec"), "--quiet"]) == 2
    assert "train_identities.json: must be a JSON object" in capsys.readouterr().err
    (raw / "train_identities.json").unlink()
    # an explicit table that is missing is named
    args = ["data", "align", "--images", str(raw / "train.rec"), "--landmarks", str(tmp_path / "no.npy"),
            "--out", str(tmp_path / "b.rec"), "--quiet"]  # fmt: skip
    assert main(args) == 2
    assert "--landmarks " + str(tmp_path / "no.npy") + ": no such file" in capsys.readouterr().err


def test_an_align_that_stops_leaves_an_unfinished_folder_the_rerun_completes(wild_folder, tmp_path, capsys):
    """A stopped align into a folder left a manifest-less partial set that `data info`, embed and
    merge took as whole, and the plain rerun refused its own leftover; with --overwrite over an
    aligned folder it left the old manifest over a mix of old and new images."""
    root, _ = wild_folder
    points = ImageFolderDataset(root).landmarks.copy()
    nan = points.copy()
    nan[[3, 4]] = np.nan  # no face to place: refused before any image is written
    np.save(tmp_path / "nan.npy", nan)
    args = ["data", "align", "--images", str(root), "--out", str(tmp_path / "nan"), "--landmarks"]
    assert main([*args, str(tmp_path / "nan.npy"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert (
        f"2 of {len(points)} rows hold NaN or infinite coordinates" in err and "faces cannot be placed" in err
    )
    assert not (tmp_path / "nan").exists()
    points[4] = points[4].mean(axis=0)  # all five points at one place: the run stops after four
    bad = tmp_path / "bad.npy"
    np.save(bad, points)

    def align(out, *extra):
        return main(["data", "align", "--images", str(root), "--out", str(out), "--quiet", *extra])

    out = tmp_path / "out"
    assert align(out, "--landmarks", str(bad)) == 2
    capsys.readouterr()
    assert main(["data", "info", str(out)]) == 2
    assert "out: is unfinished: the command writing it stopped part-way" in capsys.readouterr().err
    assert align(out) == 0  # the plain rerun finishes it, as if it had never stopped
    assert align(tmp_path / "clean") == 0
    for a, b in zip(ImageFolderDataset(out).paths, ImageFolderDataset(tmp_path / "clean").paths, strict=True):
        assert (out / a).read_bytes() == (tmp_path / "clean" / b).read_bytes()
    assert (out / "manifest.jsonl").read_bytes() == (tmp_path / "clean" / "manifest.jsonl").read_bytes()
    assert align(out, "--landmarks", str(bad), "--overwrite") == 2  # over a finished set
    assert not (out / "manifest.jsonl").exists()
    with pytest.raises(VigfaceError, match="is unfinished"):
        ImageFolderDataset(out)


@pytest.mark.parametrize("out_format", ["folder", "rec"])
def test_an_image_that_does_not_decode_is_skipped_and_named(wild_folder, tmp_path, out_format):
    """A truncated image stopped the run there (a folder output was left unfinished); the loaders
    skip such images when training, and so does align now, naming them."""
    root, _ = wild_folder
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    src = ImageFolderDataset(copy)
    (copy / src.paths[2]).write_bytes((copy / src.paths[2]).read_bytes()[:50])
    out = tmp_path / ("out.rec" if out_format == "rec" else "out")
    with pytest.warns(
        VigfaceWarning, match=rf"skipped 1 image\(s\) that do not decode \(first: .*{src.paths[2]}"
    ):
        summary = align_image_folder(copy, out, image_format="png", out_format=out_format, progress=False)
    assert summary == {"images": 5, "skipped": 1, "identities": 3}
    order = np.argsort(src.labels, kind="stable") if out_format == "rec" else range(6)  # .rec: grouped
    kept = [int(i) for i in order if i != 2]
    aligned = FaceRecordDataset(out) if out_format == "rec" else ImageFolderDataset(out)
    assert len(aligned) == 5 and aligned.labels.tolist() == [int(src.labels[i]) for i in kept]
    for n, i in enumerate(kept):
        np.testing.assert_array_equal(aligned[n][0], align_faces(src[i][0], src.landmarks[i])[0])
    if out_format == "rec":
        assert np.load(tmp_path / "out_landmarks.npy").shape == (5, 5, 2)


def test_quality_and_size_out_of_range_are_refused(wild_folder, tmp_path):
    """--quality 0 / 101 were taken without a word; --size 100000 asked NumPy for 28 GiB per image."""
    root, _ = wild_folder
    for option, message in (
        ({"quality": 0}, "--quality must be in 1..100, got 0"),
        ({"quality": 101}, "--quality must be in 1..100, got 101"),
        ({"size": 100_000}, "--size must be in 16..2048 pixels, got 100000"),
    ):
        with pytest.raises(VigfaceError, match=message):
            align_image_folder(root, tmp_path / "out", progress=False, **option)
    assert not (tmp_path / "out").exists()
