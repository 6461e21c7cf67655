"""`vigface data merge`: labels made disjoint (or joined for generated real ids), bytes copied as
they were, landmarks carried, and every bad input refused before anything is written."""

import json

import numpy as np
import pytest

from vigface.cli.main import main
from vigface.data.image_folder import ImageFolderDataset, ImageFolderWriter
from vigface.data.images import encode_image
from vigface.data.merge import merge_datasets
from vigface.data.recordio import FaceRecordDataset, FaceRecordWriter
from vigface.errors import VigfaceError
from vigface.run_lock import FolderLock


def _image(seed: int, size: int = 16) -> bytes:
    """A distinct small PNG per seed (PNG: lossless, so equal bytes mean the same image)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return encode_image(pixels, "png")


def _rec(folder, labels, first_seed, landmarks=True, size=16):
    """train.rec of `_image(first_seed + i)` labelled `labels` (grouped); landmark row i = 100 * seed."""
    with FaceRecordWriter(folder) as writer:
        for i, label in enumerate(labels):
            writer.add(_image(first_seed + i, size), label)
    if landmarks:
        rows = np.stack([np.full((5, 2), 100.0 * (first_seed + i)) for i in range(len(labels))])
        np.save(folder / "train_landmarks.npy", rows.astype(np.float32))
    return folder


def _generated(folder, kinds: dict[int, tuple[str, int]], per_id: int, first_seed: int):
    """A vigface-gen-like output: train.rec + generation.json mapping label -> (kind, prototype)."""
    labels = [label for label in sorted(kinds) for _ in range(per_id)]
    _rec(folder, labels, first_seed)
    meta = {"plan": {"config": {"format": "rec"}}, "labels": {str(k): list(v) for k, v in kinds.items()}}
    (folder / "generation.json").write_text(json.dumps(meta))
    return folder


def _read(folder):
    """(seed of each image, label) in record order, found by matching bytes against _image(seed)."""
    ds = FaceRecordDataset(folder / "train.rec")
    by_bytes = {_image(seed): seed for seed in range(1000)}
    rows = []
    for i in range(len(ds)):
        payload, label = ds.encoded(i)
        rows.append((by_bytes[payload], label))
    ds.close()
    return rows


def test_two_recs_get_offset_labels_same_bytes_and_landmarks(tmp_path):
    a = _rec(tmp_path / "a", [0, 0, 1, 1, 1], first_seed=0)
    b = _rec(tmp_path / "b", [0, 2, 2], first_seed=10)  # label 1 unused: b's class count is 3
    summary = merge_datasets([a, b], tmp_path / "m", progress=False)

    # by hand: a keeps labels 0, 1; b's labels shift by a's class count (2)
    assert _read(tmp_path / "m") == [(0, 0), (1, 0), (2, 1), (3, 1), (4, 1), (10, 2), (11, 4), (12, 4)]
    landmarks = np.load(tmp_path / "m" / "train_landmarks.npy")
    assert landmarks.shape == (8, 5, 2)
    assert landmarks[:, 0, 0].tolist() == [100.0 * s for s in (0, 1, 2, 3, 4, 10, 11, 12)]
    meta = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert meta == summary
    assert [x["label_offset"] for x in meta["inputs"]] == [0, 2]
    assert (meta["images"], meta["identities"], meta["num_classes"], meta["landmarks"]) == (8, 4, 5, True)
    assert FaceRecordDataset(tmp_path / "m" / "train.rec").identity_ranges is not None


def test_an_image_folder_merges_with_a_rec_and_ungrouped_labels_are_grouped(tmp_path):
    folder = tmp_path / "folder"
    with ImageFolderWriter(folder, fmt="png") as writer:
        for seed, label in ((20, 1), (21, 0), (22, 1)):  # label 1, then 0, then 1 again
            writer.add(_image(seed), label, landmarks=np.full((5, 2), 100.0 * seed))
    rec = _rec(tmp_path / "rec", [0, 0], first_seed=30)
    merge_datasets([folder, rec / "train.rec"], tmp_path / "m", progress=False)
    assert ImageFolderDataset(folder).num_classes == 2
    assert _read(tmp_path / "m") == [(21, 0), (20, 1), (22, 1), (30, 2), (31, 2)]
    landmarks = np.load(tmp_path / "m" / "train_landmarks.npy")
    assert landmarks[:, 0, 0].tolist() == [2100.0, 2000.0, 2200.0, 3000.0, 3100.0]


def test_generated_real_ids_join_their_real_class_and_virtual_ids_follow(tmp_path):
    real = _rec(tmp_path / "real", [0, 0, 1, 1, 2, 2], first_seed=0)
    # vigface-gen labels: 0, 1 are real prototypes 2 and 0; 2, 3 are virtual prototypes 0, 1
    kinds = {0: ("real", 2), 1: ("real", 0), 2: ("virtual", 0), 3: ("virtual", 1)}
    gen = _generated(tmp_path / "gen", kinds, per_id=2, first_seed=50)
    summary = merge_datasets([real, gen], tmp_path / "m", real_ids="join", progress=False)
    # gen images 50, 51 (real prototype 2) join real class 2; 52, 53 (prototype 0) join class 0;
    # its virtual ids take the next labels, 3 and 4 (no label is left empty)
    assert _read(tmp_path / "m") == [
        (0, 0), (1, 0), (52, 0), (53, 0), (2, 1), (3, 1), (4, 2), (5, 2), (50, 2), (51, 2),
        (54, 3), (55, 3), (56, 4), (57, 4),
    ]  # fmt: skip
    assert summary["num_classes"] == 5 and summary["identities"] == 5
    assert summary["inputs"][1]["images_joined"] == 4

    # an input after the joined set starts after its 2 own (virtual) classes, not its 4 labels
    extra = _rec(tmp_path / "extra", [0], first_seed=90)
    summary = merge_datasets([real, gen, extra], tmp_path / "m3", real_ids="join", progress=False)
    assert _read(tmp_path / "m3")[-1] == (90, 5)
    assert [x["label_offset"] for x in summary["inputs"]] == [0, 3, 5]

    separate = merge_datasets([real, gen], tmp_path / "s", real_ids="separate", progress=False)
    assert [label for _, label in _read(tmp_path / "s")] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    assert separate["num_classes"] == 7


def test_generated_real_ids_need_a_choice_and_a_real_set_to_join(tmp_path):
    real = _rec(tmp_path / "real", [0, 0, 1, 1], first_seed=0)
    gen = _generated(tmp_path / "gen", {0: ("real", 1), 1: ("virtual", 0)}, per_id=2, first_seed=50)
    with pytest.raises(VigfaceError, match="--real-ids join .* or --real-ids separate"):
        merge_datasets([real, gen], tmp_path / "m", progress=False)
    gen2 = _generated(tmp_path / "gen2", {0: ("real", 0)}, per_id=2, first_seed=60)
    with pytest.raises(VigfaceError, match="every input is a generated set"):
        merge_datasets([gen, gen2], tmp_path / "m", real_ids="join", progress=False)
    far = _generated(tmp_path / "far", {0: ("real", 5)}, per_id=2, first_seed=70)
    with pytest.raises(VigfaceError, match="real prototype 5, but .*real has only 2 classes"):
        merge_datasets([real, far], tmp_path / "m", real_ids="join", progress=False)
    virtual_only = _generated(tmp_path / "virtual", {0: ("virtual", 0)}, per_id=2, first_seed=80)
    merge_datasets([real, virtual_only], tmp_path / "v", progress=False)  # nothing to choose
    assert not (tmp_path / "m").exists()


def test_bad_inputs_are_refused_before_anything_is_written(tmp_path):
    a = _rec(tmp_path / "a", [0, 1], first_seed=0)
    b = _rec(tmp_path / "b", [0, 1], first_seed=10)
    big = _rec(tmp_path / "big", [0], first_seed=20, size=24)
    out = tmp_path / "m"
    cases = [
        ([a], "at least two datasets"),
        ([a, a / "train.rec"], "listed twice"),
        ([a, big], r"big: images are 24x24, but .*a's are 16x16"),
        ([a, tmp_path / "missing"], "missing: no such dataset"),  # was "--out m: lies inside ... missing"
    ]
    for inputs, message in cases:
        with pytest.raises(VigfaceError, match=message):
            merge_datasets(inputs, out, progress=False)
        assert not out.exists()
    with pytest.raises(VigfaceError, match="is also an input"):
        merge_datasets([a, b], a, progress=False)
    folder = tmp_path / "folder"  # an image folder
    with ImageFolderWriter(folder, fmt="png") as writer:
        writer.add(_image(30), 0)
        writer.add(_image(31), 0)
    with pytest.raises(VigfaceError, match="lies inside .*the input"):  # it would become an identity of it
        merge_datasets([folder, b], folder / "merged", progress=False)
    assert not (folder / "merged").exists()
    # beside a .rec input, or inside a folder holding one, harms nothing (it was refused as "inside")
    merge_datasets([a / "train.rec", b], tmp_path / "a" / "merged", progress=False)
    assert len(FaceRecordDataset(tmp_path / "a" / "merged" / "train.rec")) == 4
    with pytest.raises(VigfaceError, match="must be a folder"):
        merge_datasets([a, b], tmp_path / "x.rec", progress=False)

    unfinished = tmp_path / "unfinished_gen"
    (unfinished / "shards").mkdir(parents=True)
    (unfinished / "generation.json").write_text("{}")
    with pytest.raises(VigfaceError, match="not finished .*run the same vigface-gen command again"):
        merge_datasets([a, unfinished], out, progress=False)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "toy.json").write_text("{}")
    with pytest.raises(VigfaceError, match="holds toy.json"):
        merge_datasets([a, b], foreign, progress=False)
    assert sorted(p.name for p in foreign.iterdir()) == ["toy.json"]

    busy = tmp_path / "busy"  # another merge writing there (its lock held)
    busy.mkdir()
    with FolderLock(busy) as held:
        held.acquire()
        with pytest.raises(VigfaceError, match=r"another process \(pid \d+\) is writing into"):
            merge_datasets([a, b], busy, progress=False)
    assert not (busy / "train.rec").exists()

    merge_datasets([a, b], out, progress=False)
    before = (out / "train.rec").read_bytes()
    with pytest.raises(VigfaceError, match="already exists; pass --overwrite"):
        merge_datasets([b, a], out, progress=False)
    assert (out / "train.rec").read_bytes() == before
    merge_datasets([b, a], out, overwrite=True, progress=False)
    assert [seed for seed, _ in _read(out)] == [10, 11, 0, 1]


def test_rows_an_input_lacks_stay_nan_and_are_counted(tmp_path):
    folder = tmp_path / "folder"
    with ImageFolderWriter(folder, fmt="png") as writer:
        writer.add(_image(40), 0, landmarks=np.full((5, 2), 4000.0))
        writer.add(_image(41), 0)  # no landmarks in its manifest line
    rec = _rec(tmp_path / "rec", [0], first_seed=42)
    summary = merge_datasets([folder, rec], tmp_path / "m", real_ids="join", progress=False)
    table = np.load(tmp_path / "m" / "train_landmarks.npy")
    assert np.isnan(table[1]).all() and table[0, 0, 0] == 4000.0 and table[2, 0, 0] == 4200.0
    assert summary["landmarks"] is True and summary["landmark_rows_missing"] == 1
    assert summary["real_ids"] is None  # no generated real ids: nothing was joined


def test_an_input_without_landmarks_drops_the_table_and_says_which(tmp_path):
    a = _rec(tmp_path / "a", [0, 1], first_seed=0)
    b = _rec(tmp_path / "b", [0], first_seed=10, landmarks=False)
    out = tmp_path / "m"
    merge_datasets([a, b], out, progress=False)
    np.save(out / "train_landmarks.npy", np.zeros((3, 5, 2), np.float32))  # a stale table ...
    summary = merge_datasets([a, b], out, overwrite=True, progress=False)
    assert not (out / "train_landmarks.npy").exists()  # ... is not left beside the new .rec
    assert summary["landmarks"] is False and summary["landmarks_missing_in"] == [str(b)]


def test_an_interrupted_merge_leaves_no_output(tmp_path, monkeypatch):
    a = _rec(tmp_path / "a", [0, 1, 2], first_seed=0)
    b = _rec(tmp_path / "b", [0, 1], first_seed=10)
    calls = {"n": 0}
    real_encoded = FaceRecordDataset.encoded

    def interrupted(self, i):
        calls["n"] += 1
        if calls["n"] == 5:  # the first two are the size checks' reads
            raise KeyboardInterrupt
        return real_encoded(self, i)

    monkeypatch.setattr(FaceRecordDataset, "encoded", interrupted)
    with pytest.raises(KeyboardInterrupt):
        merge_datasets([a, b], tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()  # not even an empty folder (nor its lock file)


def test_cli_merges_and_reports_errors_in_one_line(tmp_path, capsys):
    a = _rec(tmp_path / "a", [0, 1], first_seed=0)
    gen = _generated(tmp_path / "gen", {0: ("real", 1), 1: ("virtual", 0)}, per_id=2, first_seed=50)
    assert main(["data", "merge", str(a), str(gen), "--out", str(tmp_path / "m"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vigface: error: ") and "--real-ids" in err and "\n" not in err
    args = ["data", "merge", str(a), str(gen), "--out", str(tmp_path / "m"), "--real-ids", "join", "--quiet"]
    assert main(args) == 0
    assert "merged 6 images of 3 identities from 2 datasets" in capsys.readouterr().out
    assert main(["data", "info", str(tmp_path / "m")]) == 0
    info = capsys.readouterr().out
    assert "images: 6" in info and f"merged_from: ['{a} (2 images, labels from 0)'" in info


def test_a_payload_that_is_no_image_is_named_in_its_input_and_the_old_merge_kept(tmp_path):
    """The writer named its own output's key ('m/train.rec: image for key 26 ...'), and a failed
    --overwrite left the old train.rec without the merge.json that describes it."""
    a = _rec(tmp_path / "a", [0, 1], first_seed=0)
    out = tmp_path / "m"
    merge_datasets([a, _rec(tmp_path / "b", [0, 0], first_seed=10)], out, progress=False)
    before = {name: (out / name).read_bytes() for name in ("train.rec", "train.idx", "merge.json")}
    bad = _rec(tmp_path / "bad", [0, 1], first_seed=30)
    payload = _image(31)  # key 2's image, zeroed in place: its record holds no image any more
    rec = bad / "train.rec"
    rec.write_bytes(rec.read_bytes().replace(payload, bytes(len(payload))))
    with pytest.raises(
        VigfaceError, match=r"bad: train.rec key 2 is not an encoded image \(starts with 0000"
    ):
        merge_datasets([a, bad], out, overwrite=True, progress=False)
    assert {name: (out / name).read_bytes() for name in before} == before
