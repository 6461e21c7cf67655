"""Small file-system helpers shared by the writers."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable; best effort (some file systems refuse)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def usual_permissions(path: str | os.PathLike) -> None:
    """Give `path` the mode open() gives a new file (0666 less the umask).

    safetensors' writer creates its files 0600, so models and embeddings were readable by their
    owner alone, unlike every other output (a model shared through a group folder could not load)."""
    mask = os.umask(0)  # the only way to read the umask; set back at once
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def sort_safetensors_metadata(path: str | os.PathLike) -> None:
    """Rewrite a .safetensors header in place with its metadata keys sorted.

    safetensors keeps the metadata in a hash map, so two saves of the same tensors and metadata
    (two keys or more) differed in bytes, run to run. The header's length does not change: the same
    compact JSON, only reordered, padded with spaces as safetensors pads it."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # not the JSON safetensors wrote; leave its (valid) header as it is
            return
        f.seek(8)
        f.write(text.ljust(size, b" "))


def write_atomically(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` to a temporary name beside `path`, then rename it there: a crash or a full disk
    leaves the old file (or none), never a half-written one under the real name."""
    path = Path(path)
    if path.is_dir():  # else the rename below fails naming the temporary file first
        raise IsADirectoryError(errno.EISDIR, "is a folder; a file is to be written there", str(path))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # after a failed write; after the rename there is nothing


# Config fields naming input files: the CLI stores them absolute, and resuming compares them as
# paths, so that a run started as `--data toy` continues from any folder as `--data /abs/toy`.
INPUT_PATH_FIELDS = ("data", "fr_model", "landmarks", "val")


def resolved_paths(value):
    """A path string (or a list of them) made absolute; anything else (None, "") as it is."""
    if isinstance(value, str) and value:
        return str(Path(value).resolve())
    if isinstance(value, list):
        return [resolved_paths(v) for v in value]
    return value


def setting_changed(name: str, before, now) -> bool:
    """Whether a config field's value differs, input paths compared by what they name (resolved
    against the current folder: a relative path saved elsewhere may then still differ)."""
    if before == now:
        return False
    return name not in INPUT_PATH_FIELDS or resolved_paths(before) != resolved_paths(now)
