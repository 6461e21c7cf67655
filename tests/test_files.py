"""write_atomically: the real name holds the old file or the whole new one, never a part."""

import errno
import os
from pathlib import Path

import pytest

from vigface.data.files import usual_permissions, write_atomically


def test_replaces_the_whole_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")
    write_atomically(path, '{"new": 1}')
    assert path.read_text() == '{"new": 1}'
    write_atomically(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"old graph")
    real_write_bytes = Path.write_bytes

    def half_then_full(self, data):  # what a write to a full disk does: part of it lands, then ENOSPC
        real_write_bytes(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    with pytest.raises(OSError) as caught:
        write_atomically(path, b"a new graph, longer")
    assert caught.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert path.read_bytes() == b"old graph"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # the half-written temporary is gone


def test_a_folder_in_the_way_is_named_and_left_alone(tmp_path):
    (tmp_path / "out.onnx").mkdir()
    with pytest.raises(IsADirectoryError) as caught:
        write_atomically(tmp_path / "out.onnx", b"graph")
    assert caught.value.filename == str(tmp_path / "out.onnx") and caught.value.filename2 is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_usual_permissions_are_what_open_gives(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("x")
    private = tmp_path / "private"
    private.write_text("x")
    os.chmod(private, 0o600)  # what safetensors' writer leaves
    usual_permissions(private)
    assert private.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    old = os.umask(0o077)
    try:
        usual_permissions(private)
        assert private.stat().st_mode & 0o777 == 0o600  # a private umask keeps it private
        assert os.umask(0o077) == 0o077  # and the umask is as it was
    finally:
        os.umask(old)
