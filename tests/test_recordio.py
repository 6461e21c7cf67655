"""RecordIO (.rec/.idx): dmlc bytes, continuation records, InsightFace layout, streaming, corrupt files."""

import os
import pickle
import struct
import time
import tracemalloc

import numpy as np
import pytest

from vigface.data.images import encode_image
from vigface.data.recordio import (
    FaceRecordDataset,
    FaceRecordWriter,
    IRHeader,
    RecordIOReader,
    RecordIOWriter,
    encode_record,
    pack_record,
    scan_records,
    unpack_record,
)
from vigface.errors import DataFormatError, VigfaceError, VigfaceWarning

MAGIC_LE = bytes.fromhex("0a23d7ce")  # 0xced7230a little-endian


def lrec(cflag, length):
    return struct.pack("<I", (cflag << 29) | length)


def write_pair(tmp_path, records, name="t"):
    rec, idx = tmp_path / f"{name}.rec", tmp_path / f"{name}.idx"
    with RecordIOWriter(rec, idx) as w:
        for key, payload in records:
            w.write(key, payload)
    return rec, idx


def image(seed, size=16):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- exact bytes


def test_plain_records_match_hand_computed_bytes(tmp_path):
    rec, idx = write_pair(tmp_path, [(7, b"hello"), (3, b"abcd"), (9, b"")])
    expected = (
        MAGIC_LE + bytes.fromhex("05000000") + b"hello" + b"\0\0\0"  # 5 bytes + 3 padding
        + MAGIC_LE + bytes.fromhex("04000000") + b"abcd"  # aligned: no padding
        + MAGIC_LE + bytes.fromhex("00000000")  # empty payload: header only
    )  # fmt: skip
    assert rec.read_bytes() == expected
    assert idx.read_text() == "7\t0\n3\t16\n9\t28\n"
    reader = RecordIOReader(rec)
    assert reader.keys == [7, 3, 9]
    assert [reader.read(k) for k in (7, 3, 9)] == [b"hello", b"abcd", b""]


def test_payload_with_magic_is_split_like_dmlc(tmp_path):
    # Magic at aligned offset 4: parts "ab\0\0" (cflag 1) and "cdefg" (cflag 3); magic dropped.
    payload = b"ab\0\0" + MAGIC_LE + b"cdefg"
    expected = (
        MAGIC_LE + bytes.fromhex("04000020") + b"ab\0\0"
        + MAGIC_LE + bytes.fromhex("05000060") + b"cdefg" + b"\0\0\0"
    )  # fmt: skip
    assert encode_record(payload) == expected
    # A middle part gets cflag 2; a magic at offset 0 gives an empty first part.
    payload3 = MAGIC_LE + b"wxyz" + MAGIC_LE + b"q"
    expected3 = (
        MAGIC_LE + lrec(1, 0)
        + MAGIC_LE + lrec(2, 4) + b"wxyz"
        + MAGIC_LE + lrec(3, 1) + b"q\0\0\0"
    )  # fmt: skip
    assert encode_record(payload3) == expected3
    # An unaligned magic stays inside an ordinary (cflag 0) record.
    unaligned = b"xy" + MAGIC_LE + b"zw"
    assert encode_record(unaligned) == MAGIC_LE + lrec(0, 8) + unaligned

    rec, _ = write_pair(tmp_path, [(0, payload), (1, payload3), (2, unaligned)])
    assert rec.read_bytes() == expected + expected3 + MAGIC_LE + lrec(0, 8) + unaligned
    reader = RecordIOReader(rec)
    assert [reader.read(k) for k in (0, 1, 2)] == [payload, payload3, unaligned]


def test_reader_joins_hand_written_continuation_parts(tmp_path):
    # Written by hand (not by our writer): parts 1, 2, 3 of one record, then a plain record.
    body = (
        MAGIC_LE + lrec(1, 3) + b"abc\0"
        + MAGIC_LE + lrec(2, 0)
        + MAGIC_LE + lrec(3, 2) + b"de\0\0"
        + MAGIC_LE + lrec(0, 1) + b"z\0\0\0"
    )  # fmt: skip
    (tmp_path / "h.rec").write_bytes(body)
    (tmp_path / "h.idx").write_text("5\t0\n6\t32\n")
    reader = RecordIOReader(tmp_path / "h.rec")
    assert reader.read(5) == b"abc" + MAGIC_LE + MAGIC_LE + b"de"
    assert reader.read(6) == b"z"
    assert list(reader) == [(5, b"abc" + MAGIC_LE + MAGIC_LE + b"de"), (6, b"z")]
    assert list(scan_records(tmp_path / "h.rec")) == [(0, b"abc" + MAGIC_LE + MAGIC_LE + b"de"), (32, b"z")]


def test_continuation_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    payloads = [MAGIC_LE, MAGIC_LE * 3, MAGIC_LE + b"x", b"abc" + MAGIC_LE, b"abcd" + MAGIC_LE]
    for _ in range(200):
        chunks = []
        for _ in range(rng.integers(0, 8)):
            chunks.append(rng.bytes(int(rng.integers(0, 9))))
            chunks.append(MAGIC_LE)
        payloads.append(b"".join(chunks))
    rec, _ = write_pair(tmp_path, list(enumerate(payloads)))
    reader = RecordIOReader(rec)
    assert [reader.read(k) for k in range(len(payloads))] == payloads
    assert [p for _, p in reader] == payloads
    assert [p for _, p in scan_records(rec)] == payloads


# --------------------------------------------------------------------------- IRHeader


def test_pack_unpack_scalar_and_vector_labels():
    packed = pack_record(IRHeader(0, 3.0, 11, 0), b"IMG")
    assert packed == struct.pack("<IfQQ", 0, 3.0, 11, 0) + b"IMG"
    header, img = unpack_record(packed)
    assert header == IRHeader(0, 3.0, 11, 0) and img == b"IMG"

    packed = pack_record(IRHeader(0, [5, 9], 4, 1), b"")
    assert packed == struct.pack("<IfQQ", 2, 0.0, 4, 1) + struct.pack("<2f", 5, 9)
    header, img = unpack_record(packed)
    assert header.flag == 2 and header.id == 4 and header.id2 == 1 and img == b""
    np.testing.assert_array_equal(header.label, [5.0, 9.0])
    assert header.label.dtype == np.float32

    # mxnet.recordio.pack overrides the flag for scalar labels.
    assert pack_record(IRHeader(7, 1.5, 0, 0))[:4] == b"\0\0\0\0"


def test_unpack_rejects_short_payloads():
    with pytest.raises(DataFormatError, match="shorter than the 24-byte IRHeader"):
        unpack_record(b"\0" * 10, "x.rec", 40)
    with pytest.raises(DataFormatError, match="x.rec at byte offset 8: IRHeader flag 1000"):
        unpack_record(struct.pack("<IfQQ", 1000, 0, 0, 0) + b"abcd", "x.rec", 8)


# --------------------------------------------------------------------------- InsightFace layout


def make_face_rec(tmp_path, ids=3, per_id=(2, 3, 1)):
    jpegs = {}
    with FaceRecordWriter(tmp_path / "data") as w:
        for label in range(ids):
            for k in range(per_id[label]):
                data = encode_image(image(10 * label + k), "jpeg", quality=90)
                key = w.add(data, label=label)
                jpegs[key] = (data, label)
    return tmp_path / "data" / "train.rec", jpegs


def test_insightface_layout_read_as_arcface_torch_does(tmp_path):
    rec, jpegs = make_face_rec(tmp_path)
    assert (tmp_path / "data" / "train.idx").is_file()
    reader = RecordIOReader(rec)
    # arcface_torch MXFaceDataset.__init__
    header0, _ = unpack_record(reader.read(0))
    assert header0.flag > 0
    imgidx = list(range(1, int(header0.label[0])))
    assert imgidx == [1, 2, 3, 4, 5, 6]
    # arcface_torch MXFaceDataset.__getitem__
    for idx in imgidx:
        header, img = unpack_record(reader.read(idx))
        label = header.label if header.flag == 0 else header.label[0]
        assert (img, int(label)) == jpegs[idx] and header.id == idx
    # Identity records 7..9 hold each identity's [start, end) key range; header record id2 = 1.
    assert (int(header0.label[0]), int(header0.label[1])) == (7, 10) and header0.id2 == 1
    ranges = [tuple(unpack_record(reader.read(k))[0].label.astype(int)) for k in range(7, 10)]
    assert ranges == [(1, 3), (3, 6), (6, 7)]
    # Record 0 is written last; the index still finds it.
    assert reader.keys[-1] == 0 and reader.offset(0) > reader.offset(9)

    ds = FaceRecordDataset(rec)
    assert len(ds) == 6 and ds.num_classes == 3
    assert ds.labels.tolist() == [0, 0, 1, 1, 1, 2]
    np.testing.assert_array_equal(ds.identity_ranges, [[1, 3], [3, 6], [6, 7]])
    img, label = ds[2]
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8 and label == 1
    assert ds.encoded(2) == (jpegs[3][0], 1)
    assert ds.header(-1).id == 6
    assert [lab for _, lab in ds] == ds.labels.tolist()
    with pytest.raises(IndexError):
        ds[6]


def test_face_writer_accepts_arrays_and_png_exactly(tmp_path):
    images = [image(i, 12) for i in range(4)]
    with FaceRecordWriter(tmp_path / "p.rec", fmt="png") as w:
        for i, img in enumerate(images):
            w.add(img, label=i // 2)
    ds = FaceRecordDataset(tmp_path / "p.rec")
    for i, img in enumerate(images):
        got, label = ds[i]
        np.testing.assert_array_equal(got, img)  # PNG is lossless
        assert label == i // 2


def test_face_writer_requires_grouped_labels_and_leaves_nothing(tmp_path):
    jpeg = encode_image(image(0), "jpeg")
    with pytest.raises(VigfaceError, match="grouped by label.*label 0 reappears at key 3"):
        with FaceRecordWriter(tmp_path) as w:
            w.add(jpeg, 0)
            w.add(jpeg, 1)
            w.add(jpeg, 0)
    assert os.listdir(tmp_path) == []
    with FaceRecordWriter(tmp_path / "x.rec") as w, pytest.raises(VigfaceError, match="not an encoded image"):
        w.add(b"not an image", 0)


def test_failed_rewrite_keeps_the_old_pair(tmp_path):
    rec, idx = write_pair(tmp_path, [(0, b"old")])
    before = rec.read_bytes(), idx.read_bytes()
    with pytest.raises(RuntimeError):
        with RecordIOWriter(rec) as w:
            w.write(0, b"new")
            raise RuntimeError("crash")
    assert (rec.read_bytes(), idx.read_bytes()) == before
    assert sorted(os.listdir(tmp_path)) == ["t.idx", "t.rec"]


def test_dataset_without_identity_header_uses_all_keys(tmp_path):
    jpeg = encode_image(image(1), "jpeg")
    rec, _ = write_pair(tmp_path, [(k, pack_record(IRHeader(0, float(k % 2), k, 0), jpeg)) for k in range(5)])
    ds = FaceRecordDataset(rec)
    assert len(ds) == 5 and ds.identity_ranges is None
    assert ds.labels.tolist() == [0, 1, 0, 1, 0] and ds.num_classes == 2
    assert ds[4][1] == 0


def test_labels_disagreeing_with_the_identity_ranges_are_read_per_record(tmp_path):
    """InsightFace layout by hand: header record 0 -> identity records at keys 4, 5 with ranges
    [1, 3) and [3, 4). An edited set whose key 2 says label 7 gets each record's own label (as
    arcface_torch reads them), with a warning, not label 0 copied from key 1."""
    jpeg = encode_image(image(2), "jpeg")

    def entry(key, label):
        return key, pack_record(IRHeader(0, float(label), key, 0), jpeg)

    def ranges_entry(key, lo, hi):
        return key, pack_record(IRHeader(2, np.array([lo, hi], dtype=np.float32), 0, 0), b"")

    images = [entry(1, 0), entry(2, 7), entry(3, 1)]
    rec, _ = write_pair(
        tmp_path, [ranges_entry(0, 4, 6), *images, ranges_entry(4, 1, 3), ranges_entry(5, 3, 4)]
    )
    with pytest.warns(VigfaceWarning, match=r"identity record 0 spans image keys 1..2, .* labels 0 and 7"):
        assert FaceRecordDataset(rec).labels.tolist() == [0, 7, 1]
    consistent = tmp_path / "ok"
    consistent.mkdir()
    rec, _ = write_pair(consistent, [ranges_entry(0, 4, 6), entry(1, 0), entry(2, 0), entry(3, 1),
                                     ranges_entry(4, 1, 3), ranges_entry(5, 3, 4)])  # fmt: skip
    assert FaceRecordDataset(rec).labels.tolist() == [0, 0, 1]


def test_index_without_the_identity_records_reads_like_arcface_torch(tmp_path):
    """arcface_torch needs only image keys 1..first-1 in the .idx; one that lacks the identity
    records is read (labels record by record) with a warning, not refused."""
    jpeg = encode_image(image(4), "jpeg")
    records = [(0, pack_record(IRHeader(0, (3, 5), 0, 1)))]
    records += [(k, pack_record(IRHeader(0, float(k + 4), k, 0), jpeg)) for k in (1, 2)]
    records += [(3, pack_record(IRHeader(0, (1, 2), 3, 0))), (4, pack_record(IRHeader(0, (2, 3), 4, 0)))]
    rec, idx = write_pair(tmp_path, records)
    idx.write_text(
        "".join(line + "\n" for line in idx.read_text().splitlines() if line.split("\t")[0] in "012")
    )
    with pytest.warns(VigfaceWarning, match=r"lacks the identity records \(keys 3..4\)"):
        ds = FaceRecordDataset(rec)
    assert len(ds) == 2 and ds.identity_ranges is None and ds.labels.tolist() == [5, 6]
    assert ds[1][1] == 6


def test_dataset_pickles_for_dataloader_workers(tmp_path):
    rec, jpegs = make_face_rec(tmp_path)
    ds = FaceRecordDataset(rec)
    ds[0]  # opens the descriptor
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.encoded(3) == ds.encoded(3) == (jpegs[4][0], 1)


# --------------------------------------------------------------------------- streaming


def test_iteration_streams_100k_records(tmp_path):
    n = 100_000
    rec, idx = tmp_path / "big.rec", tmp_path / "big.idx"
    with RecordIOWriter(rec, idx) as w:
        filler = bytes(124)
        for k in range(n):
            w.write(k, struct.pack("<I", k) + filler)
    size = rec.stat().st_size
    assert size == n * 136
    reader = RecordIOReader(rec, idx)
    tracemalloc.start()
    try:
        count = 0
        for key, payload in reader:
            assert payload[:4] == struct.pack("<I", key)
            count += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n
    # What stays is the 1 MiB read buffer, whatever the file size.
    assert peak < 1.5 * 2**20 < size / 8, f"peak {peak} bytes while streaming a {size}-byte file"
    assert reader.read(n - 1)[:4] == struct.pack("<I", n - 1)


# --------------------------------------------------------------------------- corrupt input


def corrupt(tmp_path, mutate_rec=None, idx_text=None):
    """A 3-record file (each record 8 + 24 + 4 bytes), then mutated."""
    records = [(k, pack_record(IRHeader(0, 0.0, k, 0), b"\xff\xd8\xff\xe0")) for k in range(3)]
    rec, idx = write_pair(tmp_path, records, name="bad")
    if mutate_rec is not None:
        rec.write_bytes(mutate_rec(rec.read_bytes()))
    if idx_text is not None:
        idx.write_text(idx_text)
    return rec, idx


def raises_quickly(path, *patterns):
    """Context: the block must raise DataFormatError naming `path` and matching every pattern, fast."""

    class _Check:
        def __enter__(self):
            self.t0 = time.perf_counter()
            self.ctx = pytest.raises(DataFormatError)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            suppressed = self.ctx.__exit__(*exc)
            message = str(self.info.value)
            assert str(path) in message, message
            for pattern in patterns:
                assert pattern in message, (pattern, message)
            assert time.perf_counter() - self.t0 < 2.0
            return suppressed

    return _Check()


def test_empty_rec_file(tmp_path):
    (tmp_path / "e.rec").write_bytes(b"")
    (tmp_path / "e.idx").write_text("")
    with raises_quickly(tmp_path / "e.rec", "empty file"):
        RecordIOReader(tmp_path / "e.rec")
    with raises_quickly(tmp_path / "e.rec", "empty file"):
        list(scan_records(tmp_path / "e.rec"))


def test_missing_idx_names_it(tmp_path):
    rec, idx = corrupt(tmp_path)
    idx.unlink()
    with raises_quickly(idx, "missing index file", str(rec)):
        RecordIOReader(rec)


def test_truncated_record(tmp_path):
    rec, _ = corrupt(tmp_path, mutate_rec=lambda b: b[:-10])
    reader = RecordIOReader(rec)
    assert unpack_record(reader.read(1))[0].id == 1
    with raises_quickly(rec, "byte offset 72", "runs past the end"):
        reader.read(2)
    with raises_quickly(rec, "byte offset 72"):
        list(reader)
    with raises_quickly(rec, "byte offset 72"):
        list(scan_records(rec))


def test_truncated_record_header(tmp_path):
    rec, _ = corrupt(tmp_path, mutate_rec=lambda b: b[:76])
    with raises_quickly(rec, "byte offset 72", "truncated record"):
        list(scan_records(rec))


def test_wrong_magic(tmp_path):
    rec, _ = corrupt(tmp_path, mutate_rec=lambda b: b"\xde\xad\xbe\xef" + b[4:])
    with raises_quickly(rec, "byte offset 0", "bad magic 0xefbeadde"):
        RecordIOReader(rec).read(0)


def test_idx_offset_not_at_a_record(tmp_path):
    rec, _ = corrupt(tmp_path, idx_text="0\t0\n1\t8\n")
    with raises_quickly(rec, "byte offset 8", "bad magic"):
        RecordIOReader(rec).read(1)


def test_idx_past_eof(tmp_path):
    rec, idx = corrupt(tmp_path, idx_text="0\t0\n1\t36\n2\t100000\n")
    with raises_quickly(idx, "line 3", "past the end", str(rec)):
        RecordIOReader(rec)


def test_idx_malformed_line(tmp_path):
    rec, idx = corrupt(tmp_path, idx_text="0\t0\n1 thirty-six\n")
    with raises_quickly(idx, "line 2", "key<TAB>offset", "byte offset 4"):
        RecordIOReader(rec)
    rec, idx = corrupt(tmp_path, idx_text="0\t0\n0\t36\n")
    with raises_quickly(idx, "key 0 appears twice"):
        RecordIOReader(rec)
    rec, idx = corrupt(tmp_path, idx_text="0\t0\n" + "7" * 10_000_000)
    with raises_quickly(idx, "line 2 is too long"):
        RecordIOReader(rec)


def test_huge_length_word(tmp_path):
    # Length field claims 2**29 - 1 bytes (~512 MB): refused from the file size, nothing allocated.
    rec, _ = corrupt(tmp_path, mutate_rec=lambda b: b[:40] + lrec(0, (1 << 29) - 1) + b[44:])
    with raises_quickly(rec, "byte offset 36", "record length 536870911 runs past the end"):
        RecordIOReader(rec).read(1)


def test_continuation_flag_where_a_record_starts(tmp_path):
    rec, _ = corrupt(tmp_path, mutate_rec=lambda b: b[:40] + lrec(2, 28) + b[44:])
    with raises_quickly(rec, "byte offset 36", "continuation flag 2"):
        RecordIOReader(rec).read(1)


def test_non_image_payload(tmp_path):
    records = [(0, pack_record(IRHeader(0, 0.0, 0, 0), b"this is not an image"))]
    rec, _ = write_pair(tmp_path, records, name="txt")
    ds = FaceRecordDataset(rec)
    with raises_quickly(rec, "byte offset 0", "not a decodable image"):
        ds[0]
    rec, _ = corrupt(tmp_path)  # payloads hold only a JPEG signature: truncated JPEG
    with raises_quickly(rec, "byte offset 36", "not a decodable image"):
        FaceRecordDataset(rec)[1]


def test_inconsistent_header_record(tmp_path):
    jpeg = encode_image(image(3), "jpeg")
    records = [(0, pack_record(IRHeader(0, (10, 12), 0, 1)))]
    records += [(k, pack_record(IRHeader(0, 0.0, k, 0), jpeg)) for k in (1, 2)]
    rec, _ = write_pair(tmp_path, records, name="hdr")
    with raises_quickly(rec, "byte offset 0", "header record 0 is inconsistent", "key 3 is not in"):
        FaceRecordDataset(rec)

    records = [(0, pack_record(IRHeader(0, (3, 4), 0, 1)))]
    records += [(k, pack_record(IRHeader(0, 0.0, k, 0), jpeg)) for k in (1, 2)]
    records += [(3, pack_record(IRHeader(0, (1, 9), 3, 0)))]  # identity range beyond the images
    rec, _ = write_pair(tmp_path, records, name="ident")
    ds = FaceRecordDataset(rec)
    assert len(ds) == 2
    with raises_quickly(rec, "identity record key 3"):
        _ = ds.identity_ranges


def test_an_index_cut_short_is_refused_not_read_with_wrong_counts(tmp_path):
    """vigface writes key 0's line last: a .idx cut at a line end lost it, and every remaining key
    was read as an image (identity records too: wrong counts and classes, no word); cut inside a
    line, its last offset pointed into a record and the reads blamed the .rec."""
    with FaceRecordWriter(tmp_path / "full") as w:
        for i in range(6):
            w.add(encode_image(image(i), "png"), i // 2)
    rec, idx = tmp_path / "full" / "train.rec", tmp_path / "full" / "train.idx"
    lines = idx.read_bytes().splitlines(keepends=True)
    assert lines[-1].startswith(b"0\t")  # the header's line, last
    assert len(FaceRecordDataset(rec)) == 6
    cut = tmp_path / "cut.idx"
    cut.write_bytes(b"".join(lines[:-1]))  # every image and identity line, key 0's lost
    with pytest.raises(
        DataFormatError,
        match=r"has no line for key 0 and indexes .* only up to byte \d+ of \d+: the index was cut",
    ):
        FaceRecordDataset(rec, cut)
    cut.write_bytes(b"".join(lines[:3]))  # images 1-3 only
    with pytest.raises(DataFormatError, match="has no line for key 0"):
        FaceRecordDataset(rec, cut)
    inside = b"".join(lines[:2]) + lines[2][:-3]  # line 3 cut inside its offset
    cut.write_bytes(inside)
    with pytest.raises(DataFormatError, match=r"last line 3 .*without a line end.*the index was cut short"):
        RecordIOReader(rec, cut)
    cut.write_bytes(b"".join(lines[:-1]) + lines[-1].rstrip(b"\n"))  # whole, only its last newline lost
    assert len(FaceRecordDataset(rec, cut)) == 6
    # InsightFace's layout: the header record at offset 0; an index without its line is refused too
    png = encode_image(image(2), "png")
    records = [(0, pack_record(IRHeader(2, np.array([3.0, 5.0]), 0, 0), b""))]
    records += [(k, pack_record(IRHeader(0, float(k - 1), k, 0), png)) for k in (1, 2)]
    records += [(k, pack_record(IRHeader(2, np.array([k - 2.0, k - 1.0]), k, 0), b"")) for k in (3, 4)]
    header_first, idx0 = write_pair(tmp_path, records, name="insightface")
    assert len(FaceRecordDataset(header_first)) == 2
    idx0.write_text("".join(line for line in idx0.read_text().splitlines(True) if not line.startswith("0\t")))
    with pytest.raises(
        DataFormatError, match=r"starts with the header record key 0 indexes \(images at keys 1\.\.2\)"
    ):
        FaceRecordDataset(header_first)
    # a .rec without a header record, indexed without key 0, reads every key as an image as before
    jpeg = encode_image(image(1), "jpeg")
    plain, _ = write_pair(tmp_path, [(k, pack_record(IRHeader(0, 0.0, k, 0), jpeg)) for k in range(1, 4)])
    assert len(FaceRecordDataset(plain)) == 3
