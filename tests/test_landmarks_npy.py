"""read_landmarks_npy against files made here: valid, not .npy at all, truncated, pickled, wrong shape."""

import numpy as np
import pytest

from vigface.data.landmarks_npy import read_landmarks_npy
from vigface.errors import DataFormatError


def test_a_valid_table_comes_back_as_float32(tmp_path):
    table = np.arange(3 * 5 * 2, dtype=np.float64).reshape(3, 5, 2)
    np.save(tmp_path / "lm.npy", table)
    for n in (3, None):
        got = read_landmarks_npy(tmp_path / "lm.npy", n)
        assert got.dtype == np.float32 and np.array_equal(got, table.astype(np.float32))


def test_wrong_files_name_the_file_and_the_mistake(tmp_path):
    table = np.zeros((4, 5, 2), np.float32)
    np.save(tmp_path / "good.npy", table)
    raw = (tmp_path / "good.npy").read_bytes()

    (tmp_path / "train.rec").write_bytes(b"\xce\xd7\x23\xce" + bytes(60))  # a RecordIO magic, not .npy
    with pytest.raises(DataFormatError, match=r"train.rec: is not a .npy file \(no NumPy header\)"):
        read_landmarks_npy(tmp_path / "train.rec", 4)

    (tmp_path / "cut.npy").write_bytes(raw[:-8])  # the header promises 160 bytes of data, 152 follow
    with pytest.raises(DataFormatError, match="cut.npy: is not a readable .npy array"):
        read_landmarks_npy(tmp_path / "cut.npy", 4)

    np.save(tmp_path / "objects.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataFormatError, match="objects.npy: is not a readable .npy array"):
        read_landmarks_npy(tmp_path / "objects.npy")

    wrong_rows = r"good.npy: has shape \(4, 5, 2\), expected \(6, 5, 2\) landmarks for x"
    with pytest.raises(DataFormatError, match=wrong_rows):
        read_landmarks_npy(tmp_path / "good.npy", 6, "x")
    np.save(tmp_path / "flat.npy", np.zeros((4, 10), np.float32))
    wrong_shape = r"flat.npy: has shape \(4, 10\), expected \(N, 5, 2\) landmarks$"
    with pytest.raises(DataFormatError, match=wrong_shape):
        read_landmarks_npy(tmp_path / "flat.npy")
    np.save(tmp_path / "empty.npy", np.zeros((0, 5, 2), np.float32))
    with pytest.raises(DataFormatError, match=r"has shape \(0, 5, 2\), expected \(N, 5, 2\)"):
        read_landmarks_npy(tmp_path / "empty.npy")
    with pytest.raises(FileNotFoundError):
        read_landmarks_npy(tmp_path / "missing.npy")
