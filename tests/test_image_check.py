"""`vigface data info --check-images`: every image decoded, the bad ones named, the sizes counted."""

from pathlib import Path

import numpy as np
import pytest

from vigface.cli.main import main
from vigface.data.image_check import SHOWN_FAILURES, check_images
from vigface.data.image_folder import write_image_folder
from vigface.data.images import encode_image
from vigface.data.merge import merge_datasets
from vigface.data.recordio import FaceRecordWriter
from vigface.data.verification_bin import write_bin
from vigface.errors import VigfaceError


def _jpeg(seed: int, height: int = 20, width: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return encode_image(pixels, "jpeg")


def test_a_truncated_payload_that_merge_copied_is_named_with_its_offset(tmp_path, capsys):
    """`data merge` copies payloads as they are, so a truncated JPEG reached the merged set unseen."""
    good = tmp_path / "good"
    with FaceRecordWriter(good) as writer:
        for i in range(4):
            writer.add(_jpeg(i), i // 2)
    damaged = tmp_path / "damaged"
    with FaceRecordWriter(damaged) as writer:
        writer.add(_jpeg(10), 0)
        writer.add(_jpeg(11)[:60], 0)  # cut inside its header's tables: no image at all
        writer.add(_jpeg(12), 1)
    merge_datasets([good, damaged], tmp_path / "merged", progress=False)
    rec = tmp_path / "merged" / "train.rec"

    found = check_images(tmp_path / "merged", progress=False)
    assert list(found) == [str(rec)]
    report = found[str(rec)]
    # by hand: 7 images, the 6th is the cut one; the six others are 20x16
    assert (report["images"], report["unreadable"]) == (7, 1)
    assert report["sizes"] == {"20x16": 6}
    (failure,) = report["failures"]
    assert failure.startswith(f"{rec} at byte offset ") and "is not a decodable image" in failure

    assert main(["data", "info", str(tmp_path / "merged"), "--check-images", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert f"check {rec}: 7 images, 1 unreadable; sizes 20x16 x6" in out
    assert main(["data", "info", str(good), "--check-images", "--quiet"]) == 0
    assert f"check {good / 'train.rec'}: 4 images, 0 unreadable; sizes 20x16 x4" in capsys.readouterr().out


def test_every_failure_is_counted_and_the_first_ones_named(tmp_path, capsys):
    """An image folder with more bad files than are shown, and a .bin with one bad image."""
    payloads = [b"\xff\xd8\xff broken %d" % i for i in range(SHOWN_FAILURES + 3)] + [_jpeg(0)]
    write_image_folder(tmp_path / "folder", payloads, list(range(len(payloads))))
    report = check_images(tmp_path / "folder", progress=False)[str(tmp_path / "folder")]
    assert (report["images"], report["unreadable"]) == (SHOWN_FAILURES + 4, SHOWN_FAILURES + 3)
    assert len(report["failures"]) == SHOWN_FAILURES and report["sizes"] == {"20x16": 1}
    assert main(["data", "info", str(tmp_path / "folder"), "--check-images", "--quiet"]) == 1
    assert "  ... and 3 more" in capsys.readouterr().out

    pairs = tmp_path / "pairs.bin"
    images = [_jpeg(1), _jpeg(2), _jpeg(3), b"\xff\xd8\xff broken"]
    write_bin(pairs, images, [True, False])
    report = check_images(pairs, progress=False)[str(pairs)]
    assert (report["images"], report["unreadable"]) == (4, 1)
    assert "image 3" in report["failures"][0]

    with pytest.raises(VigfaceError, match="no such file or folder"):
        check_images(tmp_path / "missing.rec", progress=False)


def test_pair_sets_beside_a_train_rec_are_checked_and_unusable_files_named(tmp_path, capsys):
    """InsightFace's layout keeps lfw.bin & co. beside train.rec: they were not checked; a .bin
    mixing sizes (which verification refuses) and an empty set passed."""
    folder = tmp_path / "faces_emore"
    with FaceRecordWriter(folder) as writer:
        writer.add(_jpeg(0), 0)
        writer.add(_jpeg(1), 1)
    write_bin(folder / "lfw.bin", [_jpeg(2), _jpeg(3, 24, 24)], [True])
    report = check_images(folder, progress=False)
    assert list(report) == [str(folder / "train.rec"), str(folder / "lfw.bin")]
    assert report[str(folder / "lfw.bin")]["problems"] == ["mixes image sizes: verification needs one"]
    assert main(["data", "info", str(folder), "--check-images", "--quiet"]) == 1
    assert "  mixes image sizes: verification needs one" in capsys.readouterr().out
    empty = tmp_path / "empty.bin"
    write_bin(empty, [], [])
    assert check_images(empty, progress=False)[str(empty)]["problems"] == ["holds no images"]


def test_info_and_the_check_survive_what_the_probe_found(tmp_path, capsys):
    """Found by a probe: a missing first image stopped --check-images (the summary read it first);
    malformed toy.json / backbone.json were tracebacks; a pipe named .bin or listed in a manifest
    hung; broken links in an image folder were skipped without a word."""
    import json
    import os
    import warnings

    from vigface.data.image_folder import ImageFolderDataset
    from vigface.data.verification_bin import read_bin
    from vigface.errors import DataFormatError, VigfaceWarning

    root = tmp_path / "listed"
    write_image_folder(root, [_jpeg(0), _jpeg(1)], [0, 0])
    manifest = (root / "manifest.jsonl").read_text().splitlines()
    first = json.loads(manifest[0])
    (root / first["path"]).unlink()
    assert main(["data", "info", str(root), "--check-images", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "first_image: unreadable" in out and "2 images, 1 unreadable" in out and "missing image" in out

    toy = tmp_path / "toy"
    toy.mkdir()
    for text in ('{"files": [', "[1, 2]", '{"files": [1]}'):
        (toy / "toy.json").write_text(text)
        assert main(["data", "info", str(toy)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"vigface: error: {toy / 'toy.json'}") and "Traceback" not in err
    (toy / "toy.json").write_text('{"files": [], "total_seconds": NaN}')  # Python's json wrote NaN
    assert main(["data", "info", str(toy), "--json"]) == 0
    strict = json.loads(capsys.readouterr().out, parse_constant=lambda token: pytest.fail(f"{token} in JSON"))
    assert strict["made_in_seconds"] == "nan"
    model = tmp_path / "model"
    model.mkdir()
    (model / "backbone.json").write_text('{"backbone": "r18", "margin": [1]}')
    assert main(["data", "info", str(model)]) == 0
    assert "backbone: None width None" in capsys.readouterr().out

    os.mkfifo(tmp_path / "pipe.bin")
    with pytest.raises(DataFormatError, match="pipe.bin: not a regular file"):
        read_bin(tmp_path / "pipe.bin")  # (it blocked on the read)
    os.mkfifo(root / "b.jpg")
    manifest[0] = json.dumps({**first, "path": "b.jpg"})
    (root / "manifest.jsonl").write_text("\n".join(manifest) + "\n")
    with pytest.raises(DataFormatError, match="b.jpg: not a regular file"):
        ImageFolderDataset(root).encoded(0)

    scanned = tmp_path / "scanned"
    write_image_folder(scanned, [_jpeg(0), _jpeg(1)], [0, 1])
    (scanned / "manifest.jsonl").unlink()
    identity = sorted(p for p in scanned.iterdir() if p.is_dir())[0]
    (identity / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    os.mkfifo(identity / "pipe.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(ImageFolderDataset(scanned)) == 2
    (warning,) = [w.message for w in caught if isinstance(w.message, VigfaceWarning)]
    assert "skipped 2 image name(s) that are not readable files" in str(warning) and "gone.jpg" in str(
        warning
    )


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_empty_info_path_and_an_unwritable_pairs_out_are_one_line_errors(tmp_path, capsys):
    """`data info ""` described the current folder; `data pairs --out /proc/x.bin` read the
    images, then failed naming its temporary file."""
    assert main(["data", "info", ""]) == 2
    assert "data info: the path is empty" in capsys.readouterr().err
    write_image_folder(tmp_path / "f", [_jpeg(i) for i in range(40)], [i // 2 for i in range(40)])
    assert main(["data", "pairs", str(tmp_path / "f"), "--out", "/proc/x.bin", "--pairs", "20"]) == 2
    assert "--out /proc/x.bin: /proc is not writable here" in capsys.readouterr().err
