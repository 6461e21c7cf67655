"""write_atomically: the real name holds the old file or the whole new one, never a part."""

import errno
import os
from pathlib import Path

import pytest

from vigface.data.files import write_atomically


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
