"""Image folders: writer + manifest round trip, folder scan without manifest, bad manifests, missing files."""

import json
import os

import numpy as np
import pytest

from vigface.data.image_folder import (
    MANIFEST,
    UNFINISHED,
    ImageFolderDataset,
    ImageFolderWriter,
    write_image_folder,
)
from vigface.data.images import encode_image
from vigface.errors import DataFormatError, VigfaceError


def image(seed, size=10):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


LANDMARKS = [[30.5, 40.25], [70.0, 40.0], [50.0, 60.0], [35.0, 80.0], [65.0, 80.125]]


def test_writer_round_trip_with_manifest(tmp_path):
    root = tmp_path / "faces"
    jpeg = encode_image(image(9), "jpeg")
    with ImageFolderWriter(root, fmt="png") as w:
        assert w.add(image(0), 0, "alice", LANDMARKS) == "alice/0.png"
        assert w.add(image(1), 0, "alice", LANDMARKS) == "alice/1.png"
        assert w.add(jpeg, 1, "bob") == "bob/0.jpg"  # encoded bytes keep their format
        assert w.add(image(2), 2) == "000002/0.png"  # default identity: zero-padded label
        assert not (root / "manifest.jsonl").exists()  # appears only at close
    lines = (root / "manifest.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {
        "path": "alice/0.png",
        "label": 0,
        "identity": "alice",
        "landmarks": LANDMARKS,
    }
    assert json.loads(lines[2]) == {"path": "bob/0.jpg", "label": 1, "identity": "bob"}

    ds = ImageFolderDataset(root)
    assert len(ds) == 4 and ds.num_classes == 3
    assert ds.labels.tolist() == [0, 0, 1, 2]
    assert ds.paths == ["alice/0.png", "alice/1.png", "bob/0.jpg", "000002/0.png"]
    assert ds.identities == ["alice", "alice", "bob", "000002"]
    np.testing.assert_array_equal(ds[1][0], image(1))  # PNG: exact pixels
    assert ds[1][1] == 0
    assert (root / "bob" / "0.jpg").read_bytes() == jpeg
    assert ds.landmarks.shape == (4, 5, 2) and ds.landmarks.dtype == np.float32
    np.testing.assert_allclose(ds.landmarks[0], LANDMARKS)
    assert np.isnan(ds.landmarks[2]).all()
    assert not [n for n in os.listdir(root) if n.endswith(".tmp")]


def test_scan_without_manifest(tmp_path):
    root = tmp_path / "scan"
    for identity, n in (("b", 12), ("a", 2), ("c", 1)):
        (root / identity).mkdir(parents=True)
        for k in range(n):
            (root / identity / f"{k}.jpg").write_bytes(encode_image(image(k), "jpeg"))
    (root / "a" / "notes.txt").write_text("ignored")
    (root / "README").write_text("ignored")
    ds = ImageFolderDataset(root)
    assert ds.landmarks is None
    assert ds.labels.tolist() == [0, 0] + [1] * 12 + [2]  # labels by sorted folder name
    assert ds.paths[2:5] == ["b/0.jpg", "b/1.jpg", "b/2.jpg"] and ds.paths[-2] == "b/11.jpg"
    img, label = ds[14]
    assert img.shape == (10, 10, 3) and label == 2
    # every format the decoder takes is found, not only .jpg / .png
    from PIL import Image

    for suffix, fmt in ((".bmp", "BMP"), (".webp", "WEBP"), (".TIFF", "TIFF")):
        Image.fromarray(image(3)).save(root / "c" / f"x{suffix}", format=fmt)
    ds = ImageFolderDataset(root)
    assert (
        ds.paths[-4:] == ["c/0.jpg", "c/x.TIFF", "c/x.bmp", "c/x.webp"] and ds.labels.tolist()[-4:] == [2] * 4
    )
    assert ds[len(ds) - 2][0].shape == (10, 10, 3)


def test_write_image_folder_helper(tmp_path):
    n = write_image_folder(tmp_path / "h", [image(i) for i in range(3)], [5, 5, 7], landmarks=[LANDMARKS] * 3)
    assert n == 3
    ds = ImageFolderDataset(tmp_path / "h")
    assert ds.labels.tolist() == [5, 5, 7] and ds.num_classes == 8
    assert ds.paths == ["000005/0.jpg", "000005/1.jpg", "000007/0.jpg"]


@pytest.mark.parametrize(
    "line, match",
    [
        ("{not json", "line 2: "),
        ('["a/0.jpg", 0]', "line 2: expected a JSON object"),
        ('{"path": "a/1.jpg", "label": "zero"}', r'line 2: "label" must be an integer in \[0, 2\*\*24\)'),
        ('{"path": "a/1.jpg", "label": 16777216}', r'"label" must be an integer in \[0, 2\*\*24\), got 1677'),
        ('{"path": "a/1.jpg", "label": true}', '"label" must be'),
        ('{"path": "../etc/passwd", "label": 0}', "must be a relative path inside"),
        ('{"path": "/etc/passwd", "label": 0}', "must be a relative path inside"),
        ('{"label": 0}', '"path" must be'),
        ('{"path": "a/1.jpg", "label": 0, "landmarks": [[1, 2]]}', '"landmarks" must be 5'),
        ('{"path": "a/1.jpg", "label": 0, "landmarks": [[1, NaN]]}', '"landmarks" must be 5'),
        # one identity, one label, as the writer keeps them (a second label was trained as its own class)
        (
            '{"path": "a/1.jpg", "label": 7, "identity": "a"}',
            "line 2: identity 'a' has label 7 here, 0 before",
        ),
        (
            '{"path": "b/0.jpg", "label": 0, "identity": "b"}',
            "line 2: label 0 is identity 'b' here, 'a' before",
        ),
    ],
)
def test_bad_manifest_line(tmp_path, line, match):
    root = tmp_path / "m"
    write_image_folder(root, [image(0)], [0], ["a"])
    first = (root / "manifest.jsonl").read_text()
    (root / "manifest.jsonl").write_text(first + line + "\n")
    with pytest.raises(DataFormatError, match=match) as info:
        ImageFolderDataset(root)
    message = str(info.value)
    assert str(root / "manifest.jsonl") in message and f"byte offset {len(first)}" in message


def test_manifest_not_utf8(tmp_path):
    root = tmp_path / "u"
    root.mkdir()
    (root / "manifest.jsonl").write_bytes(b'{"path": "\xff.jpg", "label": 0}\n')
    with pytest.raises(DataFormatError, match="line 1"):
        ImageFolderDataset(root)


def test_missing_and_corrupt_images(tmp_path):
    root = tmp_path / "x"
    write_image_folder(root, [image(0), image(1), image(2)], [0, 0, 1])
    (root / "000000" / "1.jpg").unlink()
    (root / "000001" / "0.jpg").write_bytes(b"\xff\xd8\xff garbage")
    ds = ImageFolderDataset(root)
    with pytest.raises(
        DataFormatError, match=r"000000/1.jpg: missing image \(listed in .*manifest.jsonl line 2\)"
    ):
        ds[1]
    with pytest.raises(DataFormatError, match="000001/0.jpg: image payload .* not a decodable image") as info:
        ds[2]
    assert "BytesIO" not in str(info.value)  # PIL named its in-memory buffer, by address
    (root / "000001" / "0.jpg").write_bytes(b"neither JPEG nor PNG")
    with pytest.raises(DataFormatError, match="cannot identify image file$"):
        ImageFolderDataset(root)[2]


def test_writer_refusals(tmp_path):
    root = tmp_path / "w"
    write_image_folder(root, [image(0)], [0])
    with pytest.raises(VigfaceError, match="already exists"):
        ImageFolderWriter(root)
    with ImageFolderWriter(tmp_path / "v") as w:
        w.add(image(0), 0, "ann")
        with pytest.raises(VigfaceError, match="already has label 0"):
            w.add(image(1), 1, "ann")
        with pytest.raises(VigfaceError, match="already belongs to identity 'ann'"):
            w.add(image(1), 0, "bea")
        for bad in ("..", "a/b", "", ".hidden"):
            with pytest.raises(VigfaceError, match="cannot be used as a folder name"):
                w.add(image(1), 3, bad)
        with pytest.raises(VigfaceError, match="not JPEG or PNG"):
            w.add(b"GIF89a....", 4)
        with pytest.raises(VigfaceError, match="landmarks must be 5"):
            w.add(image(1), 5, landmarks=[[0, 0]])
        for label in (-1, 2**24):  # 2**24 cannot merge into a .rec, and 10**9 sized the FR head
            with pytest.raises(VigfaceError, match=r"label must be an integer in \[0, 2\*\*24\)"):
                w.add(image(1), label)
    assert ImageFolderDataset(tmp_path / "v").labels.tolist() == [0]


def test_abort_leaves_no_manifest(tmp_path):
    """A write that stops part-way leaves no manifest, and its images do not pass for a dataset
    (read as a manifest-less folder they did: `data info`, embed and merge took the partial set)."""
    with pytest.raises(RuntimeError), ImageFolderWriter(tmp_path / "a") as w:
        w.add(image(0), 0)
        raise RuntimeError("crash")
    assert sorted(os.listdir(tmp_path / "a")) == [UNFINISHED, "000000"]
    with pytest.raises(DataFormatError, match="a: is unfinished: the command writing it stopped part-way"):
        ImageFolderDataset(tmp_path / "a")
    write_image_folder(tmp_path / "a", [image(1)], [0])  # a finished rewrite clears the mark
    assert (
        sorted(os.listdir(tmp_path / "a")) == ["000000", MANIFEST]
        and len(ImageFolderDataset(tmp_path / "a")) == 1
    )


def test_an_overwrite_that_stops_leaves_no_manifest_over_a_mix(tmp_path):
    """overwrite=True kept the old manifest until close(): a run that stopped part-way left it listing
    files that now held the new set's images (other people, under the old labels)."""
    write_image_folder(tmp_path / "a", [image(0), image(1)], [0, 0])
    with pytest.raises(RuntimeError), ImageFolderWriter(tmp_path / "a", overwrite=True) as w:
        w.add(image(2), 0)
        raise RuntimeError("crash")
    assert not (tmp_path / "a" / MANIFEST).exists()
    with pytest.raises(DataFormatError, match="is unfinished"):
        ImageFolderDataset(tmp_path / "a")


def test_not_a_folder(tmp_path):
    with pytest.raises(DataFormatError, match="not a directory"):
        ImageFolderDataset(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match="no manifest.jsonl and no"):
        ImageFolderDataset(tmp_path / "empty")


def test_a_folder_another_live_process_writes_is_refused(tmp_path):
    """A second writer (a second align into the folder a first is still writing) mixed its images
    with the first's; a stopped writer's folder may be written again."""
    import subprocess
    import sys

    folder = tmp_path / "a"
    folder.mkdir()
    (folder / UNFINISHED).write_text(f"written by process {os.getppid()}; no {MANIFEST} yet\n")  # alive
    with pytest.raises(VigfaceError, match=f"process {os.getppid()} is writing this folder"):
        ImageFolderWriter(folder)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (folder / UNFINISHED).write_text(f"written by process {gone.stdout.strip()}; no {MANIFEST} yet\n")
    write_image_folder(folder, [image(0)], [0])
    assert len(ImageFolderDataset(folder)) == 1 and not (folder / UNFINISHED).exists()


def test_an_identity_folder_without_images_is_refused(tmp_path):
    """Without a manifest it took a label no image had: a class without images (num_classes 5 for
    4 people); torchvision's ImageFolder refuses such a folder too."""
    root = tmp_path / "f"
    for identity in ("a", "c"):
        (root / identity).mkdir(parents=True)
        (root / identity / "0.jpg").write_bytes(encode_image(image(0), "jpeg"))
    (root / "b").mkdir()
    (root / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(DataFormatError, match=r"f/b: identity folder without .* images; remove or fill it"):
        ImageFolderDataset(root)
    (root / "b" / "notes.txt").unlink()
    (root / "b").rmdir()
    assert ImageFolderDataset(root).labels.tolist() == [0, 1]


def test_a_hand_written_manifest_of_flat_paths_and_labels_loads(tmp_path):
    """Lines without "identity" (flat paths, labels alone) are not held to one identity per label."""
    root = tmp_path / "flat"
    root.mkdir()
    for name in ("0001.jpg", "0002.jpg", "0003.jpg"):
        (root / name).write_bytes(encode_image(image(0), "jpeg"))
    lines = [
        '{"path": "0001.jpg", "label": 0}',
        '{"path": "0002.jpg", "label": 0}',
        '{"path": "0003.jpg", "label": 1}',
    ]
    (root / MANIFEST).write_text("\n".join(lines) + "\n")
    assert ImageFolderDataset(root).labels.tolist() == [0, 0, 1]
