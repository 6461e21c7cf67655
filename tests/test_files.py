"""write_atomically: the real name holds the old file or the whole new one, never a part."""

import errno
import os
from pathlib import Path

import pytest

from vigface.data.files import sort_safetensors_metadata, usual_permissions, write_atomically


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


def _safetensors_header(path) -> bytes:
    data = Path(path).read_bytes()
    return data[8 : 8 + int.from_bytes(data[:8], "little")]


def test_safetensors_metadata_is_written_in_sorted_key_order(tmp_path):
    """safetensors keeps metadata in a hash map: two saves of the same embeddings differed in bytes.
    Six keys: the chance that a save is already sorted is 1 / 720."""
    import json

    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    metadata = {k: f"value of {k} é" for k in ("source", "backbone_sha256", "b", "zeta", "alpha", "m")}
    tensors = {"embeddings": np.arange(12, dtype=np.float32).reshape(3, 4), "labels": np.arange(3)}
    path = tmp_path / "e.safetensors"
    save_file(tensors, path, metadata=metadata)
    size = path.stat().st_size
    sort_safetensors_metadata(path)
    header = _safetensors_header(path)
    stored = json.loads(header)["__metadata__"]
    assert list(stored) == sorted(metadata) and stored == metadata
    assert header.decode().rstrip(" ") == json.dumps(
        json.loads(header), separators=(",", ":"), ensure_ascii=False
    )  # compact JSON, padded with spaces only
    assert path.stat().st_size == size
    loaded = load_file(path)
    assert all(np.array_equal(loaded[k], tensors[k]) for k in tensors)
    with safe_open(path, "np") as f:
        assert f.metadata() == metadata
    plain = tmp_path / "plain.safetensors"  # no metadata: left alone
    save_file(tensors, plain)
    before = plain.read_bytes()
    sort_safetensors_metadata(plain)
    assert plain.read_bytes() == before
