"""read_labelled_set: which rows the per-identity limits keep, on a .rec our writer made."""

import numpy as np
import pytest

from vigface.data.recordio import FaceRecordWriter
from vigface.errors import VigfaceError
from vigface.eval.labelled_set import read_labelled_set

# Groups in file order, labels deliberately not ascending: (label, images).
GROUPS = [(5, 3), (2, 4), (9, 1), (0, 2), (7, 3)]


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    path = tmp_path_factory.mktemp("labelled") / "train.rec"
    row = 0
    with FaceRecordWriter(path, fmt="png") as w:  # lossless: pixel value = file row
        for label, n in GROUPS:
            for _ in range(n):
                w.add(np.full((8, 8, 3), row, dtype=np.uint8), label=label)
                row += 1
    return path


def expected_rows(max_ids, max_per_id):
    """Hand-listed: labels ascending, file order within a label."""
    rows, row = {}, 0
    for label, n in GROUPS:
        rows[label] = list(range(row, row + n))
        row += n
    labels = sorted(rows)[:max_ids]
    return [(label, r) for label in labels for r in rows[label][:max_per_id]]


@pytest.mark.parametrize("max_ids, max_per_id", [(None, None), (2, None), (None, 2), (3, 1), (10, 10)])
def test_limits_keep_the_first_identities_and_their_first_images(rec, max_ids, max_per_id):
    got = read_labelled_set(rec, max_ids=max_ids, max_per_id=max_per_id)
    want = expected_rows(max_ids, max_per_id)
    assert got.labels.tolist() == [label for label, _ in want]
    assert got.images[:, 0, 0, 0].tolist() == [r for _, r in want]
    assert got.kinds is None


def test_a_set_too_big_for_memory_is_refused_before_decoding(rec, monkeypatch):
    import vigface.eval.labelled_set as labelled_set

    image_bytes = 8 * 8 * 3
    monkeypatch.setattr(labelled_set, "available_memory", lambda: 10 * image_bytes)  # 80 %: 8 images
    assert len(read_labelled_set(rec, max_ids=2).labels) == 6  # labels 0 and 2: 2 + 4 images fit
    with pytest.raises(VigfaceError, match=r"13 chosen images needs .* GiB.*--max-ids"):
        read_labelled_set(rec)
    monkeypatch.setattr(labelled_set, "available_memory", lambda: None)  # the OS does not say: no check
    assert len(read_labelled_set(rec).labels) == 13
