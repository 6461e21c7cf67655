"""InsightFace / MXNet RecordIO (`train.rec` + `train.idx`), byte-compatible with dmlc-core.

A `.rec` file is a sequence of records. Each record is

    uint32 LE magic 0xced7230a
    uint32 LE lrec: cflag = lrec >> 29, length = lrec & (2**29 - 1)
    `length` payload bytes, then zero padding to a 4-byte boundary.

dmlc's writer splits a payload that holds the magic word at a 4-byte-aligned offset: it drops the
magic there and writes the pieces as parts with cflag 1 (first), 2 (middle), 3 (last); an unsplit
record has cflag 0. Readers put the magic back between the parts. Without this a reader that
resynchronises on the magic word (dmlc's InputSplit) would see a record start inside a payload.

The `.idx` file has one text line "key\\toffset\\n" per record (offset of its first magic word).
The order of records in the file does not matter to readers: they seek through the index.

The payload of an InsightFace record starts with an IRHeader (`<IfQQ`: flag, label, id, id2).
flag > 0 means the label is a vector of `flag` float32 values following the header (the header's
label field is then 0). The encoded image follows. The InsightFace layout:

    key 0              header record: label (first_identity_key, end_identity_key), no image
    keys 1..n          images, label = class id, images of one identity contiguous
    identity keys      one record per identity: label (start_key, end_key_exclusive)
"""

from __future__ import annotations

import array
import operator
import os
import stat
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from vigface.data.files import fsync_dir
from vigface.data.images import decode_image, encode_image, sniff_image_format
from vigface.errors import DataFormatError, VigfaceError, VigfaceWarning

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_HEAD = struct.Struct("<II")  # magic, lrec
_LENGTH_MASK = (1 << 29) - 1
MAX_PAYLOAD_BYTES = (1 << 29) - 1  # dmlc refuses records of 2**29 bytes or more
_IR = struct.Struct("<IfQQ")  # mxnet's "IfQQ" with native alignment is the same 24 bytes on x86/ARM
IR_HEADER_SIZE = _IR.size
# Keys and labels travel as float32 in InsightFace header/identity records: exact below 2**24.
_MAX_FLOAT32_INT = 1 << 24
# Class labels of every dataset format stay below it: an image folder must merge into a .rec, and
# a label of 10**9 sized the FR head at 10**9 classes.
MAX_LABEL = _MAX_FLOAT32_INT
_MAX_IDX_LINE = 256  # "key\toffset\n" needs at most ~40 bytes


class IRHeader(NamedTuple):
    """mxnet.recordio.IRHeader. `label` is a float, or a float32 array when flag > 0."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


# --------------------------------------------------------------------------- record payloads


def pack_record(header: IRHeader | tuple, image_bytes: bytes = b"") -> bytes:
    """IRHeader + image bytes -> record payload, like mxnet.recordio.pack.

    A scalar label gives flag 0; a vector label gives flag = its length, with the values stored
    after the header (and the header's label field 0.0).
    """
    _, label, id_, id2 = header
    if np.ndim(label) == 0:
        flag, scalar, vector = 0, float(label), b""
    else:
        values = np.asarray(label, dtype="<f4").ravel()
        flag, scalar, vector = values.size, 0.0, values.tobytes()
    for name, value in (("id", id_), ("id2", id2)):
        if not (isinstance(value, (int, np.integer)) and 0 <= value < 1 << 64):
            raise VigfaceError(
                f"pack_record: IRHeader.{name} must be an integer in [0, 2**64), got {value!r}"
            )
    return _IR.pack(flag, scalar, int(id_), int(id2)) + vector + bytes(image_bytes)


def unpack_record(
    payload: bytes, path: str | os.PathLike = "<bytes>", offset: int | None = None
) -> tuple[IRHeader, bytes]:
    """Record payload -> (IRHeader, image bytes), like mxnet.recordio.unpack.

    `path`/`offset` only name the record in the DataFormatError raised for a short payload.
    """
    if len(payload) < IR_HEADER_SIZE:
        raise DataFormatError(
            path,
            f"record payload has {len(payload)} bytes, shorter than the {IR_HEADER_SIZE}-byte IRHeader",
            offset,
        )
    flag, label, id_, id2 = _IR.unpack_from(payload)
    start = IR_HEADER_SIZE
    if flag > 0:
        start += 4 * flag
        if start > len(payload):
            raise DataFormatError(
                path,
                f"IRHeader flag {flag} announces a {flag}-value label but the payload has only "
                f"{len(payload) - IR_HEADER_SIZE} bytes after the header",
                offset,
            )
        label = np.frombuffer(payload, dtype="<f4", count=flag, offset=IR_HEADER_SIZE).astype(np.float32)
    return IRHeader(flag, label, id_, id2), bytes(payload[start:])


# --------------------------------------------------------------------------- raw records


def encode_record(payload: bytes) -> bytes:
    """The bytes dmlc's RecordIOWriter::WriteRecord emits for `payload` (parts, flags, padding)."""
    payload = bytes(payload)
    n = len(payload)
    if n > MAX_PAYLOAD_BYTES:
        raise VigfaceError(f"RecordIO records must be smaller than 2**29 bytes, got {n}")
    lower_align = n & ~3
    chunks = []
    dptr = 0  # start of the part being collected
    # dmlc checks every aligned offset i < lower_align; find() jumps between candidates instead.
    i = payload.find(_MAGIC_BYTES)
    while 0 <= i < lower_align:
        if i % 4 == 0:
            cflag = 1 if dptr == 0 else 2
            chunks += [_HEAD.pack(MAGIC, (cflag << 29) | (i - dptr)), payload[dptr:i]]
            dptr = i + 4  # the magic itself is dropped; the reader re-inserts it
            i = payload.find(_MAGIC_BYTES, dptr)
        else:
            i = payload.find(_MAGIC_BYTES, i + 1)
    cflag = 3 if dptr else 0
    chunks += [_HEAD.pack(MAGIC, (cflag << 29) | (n - dptr)), payload[dptr:], b"\0" * (-n % 4)]
    return b"".join(chunks)


def _read_record(read_at, size: int, offset: int, path: Path) -> tuple[bytes, int]:
    """Read the record whose first part starts at `offset`; returns (payload, offset after it).

    `read_at(pos, n)` returns up to n bytes at pos. Every length is checked against the file
    size before anything is read, so a corrupt length word cannot trigger a huge read.
    """
    parts = []
    pos = offset
    while True:
        if pos + 8 > size:
            raise DataFormatError(
                path,
                f"truncated record: {size - pos} bytes left where an 8-byte record header is needed",
                pos,
            )
        head = read_at(pos, 8)
        if len(head) != 8:
            raise DataFormatError(path, "truncated record header (file shrank while reading?)", pos)
        magic, lrec = _HEAD.unpack(head)
        if magic != MAGIC:
            raise DataFormatError(
                path,
                f"bad magic 0x{magic:08x} (expected 0x{MAGIC:08x}): not the start of a RecordIO record",
                pos,
            )
        cflag, length = lrec >> 29, lrec & _LENGTH_MASK
        if cflag > 3:
            raise DataFormatError(path, f"invalid continuation flag {cflag} in record header", pos)
        if not parts and cflag in (2, 3):
            raise DataFormatError(
                path, f"record part with continuation flag {cflag} where a record should start", pos
            )
        if parts and cflag in (0, 1):
            raise DataFormatError(
                path,
                f"split record interrupted: part with flag {cflag} where a continuation (2 or 3) belongs",
                pos,
            )
        padded = (length + 3) & ~3
        if pos + 8 + padded > size:
            raise DataFormatError(
                path,
                f"record length {length} runs past the end of the file ({size} bytes): truncated or corrupt",
                pos,
            )
        data = read_at(pos + 8, length) if length else b""
        if len(data) != length:
            raise DataFormatError(path, "truncated record payload (file shrank while reading?)", pos)
        parts.append(data)
        pos += 8 + padded
        if cflag in (0, 3):
            break
    return (parts[0] if len(parts) == 1 else _MAGIC_BYTES.join(parts)), pos


class _SequentialFile:
    """read_at() over a buffered file, seeking only when a read does not follow the last one."""

    def __init__(self, path: Path):
        self.file = open(path, "rb", buffering=1 << 20)  # the caller closes it
        self.pos = 0

    def read_at(self, pos: int, n: int) -> bytes:
        if pos != self.pos:
            self.file.seek(pos)
        data = self.file.read(n)
        self.pos = pos + len(data)
        return data


def _file_size(path: Path) -> int:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise DataFormatError(path, "no such RecordIO file") from None
    if not stat.S_ISREG(info.st_mode):
        raise DataFormatError(path, "not a regular file")
    size = info.st_size
    if size == 0:
        raise DataFormatError(path, "empty file: a RecordIO file holds at least one record", 0)
    return size


def scan_records(rec_path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """Yield (offset, payload) for every record of a .rec in file order, without an .idx.

    Streams through the file and validates its whole structure (useful to check a file or
    rebuild a lost index).
    """
    path = Path(rec_path)
    size = _file_size(path)
    seq = _SequentialFile(path)
    try:
        pos = 0
        while pos < size:
            payload, end = _read_record(seq.read_at, size, pos, path)
            yield pos, payload
            pos = end
    finally:
        seq.file.close()


# --------------------------------------------------------------------------- writer


class RecordIOWriter:
    """Write a .rec/.idx pair like mxnet.recordio.MXIndexedRecordIO(idx, rec, "w").

    Records go to temporary files next to the targets; close() renames them into place, so a
    crash never leaves a half-written pair under the final names. Use as a context manager:
    an exception inside the block calls abort(), which removes the temporary files.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        if self.rec_path.resolve() == self.idx_path.resolve():
            raise VigfaceError(f"{self.rec_path}: the .rec and .idx paths must differ")
        self.rec_path.parent.mkdir(parents=True, exist_ok=True)
        self.idx_path.parent.mkdir(parents=True, exist_ok=True)
        tag = f".{os.getpid()}.tmp"
        self._tmp_rec = self.rec_path.with_name(self.rec_path.name + tag)
        self._tmp_idx = self.idx_path.with_name(self.idx_path.name + tag)
        self._rec = open(self._tmp_rec, "wb")  # closed in close()/abort()
        self._idx = open(self._tmp_idx, "w", encoding="ascii", newline="\n")
        self._pos = 0
        self.count = 0
        self._done = False

    @property
    def closed(self) -> bool:
        return self._done

    def write(self, key: int, payload: bytes) -> int:
        """Append one record under `key`; returns its byte offset in the .rec."""
        if self._done:
            raise VigfaceError(f"{self.rec_path}: write() after close()/abort()")
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or key < 0:
            raise VigfaceError(f"{self.rec_path}: record keys are non-negative integers, got {key!r}")
        data = encode_record(payload)
        offset = self._pos
        self._rec.write(data)
        self._idx.write(f"{int(key)}\t{offset}\n")
        self._pos += len(data)
        self.count += 1
        return offset

    def close(self) -> None:
        """Flush, fsync and rename both files into place (no-op when already closed)."""
        if self._done:
            return
        self._done = True
        try:
            for f in (self._rec, self._idx):
                f.flush()
                os.fsync(f.fileno())
                f.close()
            # Drop a stale index first: dying between the two renames then leaves a .rec without
            # .idx (a clear "missing index" error) instead of a new .rec paired with an old .idx.
            self.idx_path.unlink(missing_ok=True)
            os.replace(self._tmp_rec, self.rec_path)
            os.replace(self._tmp_idx, self.idx_path)
        except BaseException:
            self._discard()
            raise
        fsync_dir(self.rec_path.parent)
        if self.idx_path.parent != self.rec_path.parent:
            fsync_dir(self.idx_path.parent)

    def abort(self) -> None:
        """Forget everything written: close and delete the temporary files."""
        self._done = True
        self._discard()

    def _discard(self) -> None:
        for f in (self._rec, self._idx):
            try:
                f.close()
            except OSError:
                pass
        self._tmp_rec.unlink(missing_ok=True)
        self._tmp_idx.unlink(missing_ok=True)

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# --------------------------------------------------------------------------- reader


class RecordIOReader:
    """Random access to a .rec through its .idx (like mxnet's MXIndexedRecordIO in "r" mode).

    read(key) -> payload bytes; iterating yields (key, payload) in file order, streaming.
    Reads use os.pread on one descriptor, so threads and forked DataLoader workers can share a
    reader; pickling drops the descriptor and the copy reopens the file on first use.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        self.size = _file_size(self.rec_path)
        if not self.idx_path.is_file():
            raise DataFormatError(self.idx_path, f"missing index file for {self.rec_path}")
        self._keys, self._offsets = self._parse_index()
        # Sorted copies answer key -> offset by binary search, or by subtraction when the keys
        # are consecutive (the usual case).
        order = np.argsort(self._keys, kind="stable")
        self._sorted_keys = self._keys[order]
        self._sorted_offsets = self._offsets[order]
        repeated = np.flatnonzero(self._sorted_keys[1:] == self._sorted_keys[:-1])
        if repeated.size:
            raise DataFormatError(self.idx_path, f"key {int(self._sorted_keys[repeated[0]])} appears twice")
        first = int(self._sorted_keys[0])
        self._consecutive = int(self._sorted_keys[-1]) - first == len(self._keys) - 1
        self._first_key = first
        self._file_order = bool(np.all(self._offsets[1:] > self._offsets[:-1]))
        self._fd: int | None = None

    def _parse_index(self) -> tuple[np.ndarray, np.ndarray]:
        keys, offsets = array.array("q"), array.array("q")
        line_start, last_line, last_ended = 0, (0, b""), True
        with open(self.idx_path, "rb") as f:
            # readline with a limit: a binary file passed as .idx must not become one huge "line".
            for lineno, line in enumerate(iter(lambda: f.readline(_MAX_IDX_LINE), b""), 1):
                here, line_start = line_start, line_start + len(line)
                if len(line) == _MAX_IDX_LINE and not line.endswith(b"\n"):
                    raise DataFormatError(
                        self.idx_path, f"line {lineno} is too long for 'key<TAB>offset'", here
                    )
                fields = line.split()
                if not fields:
                    continue
                try:
                    if len(fields) != 2:
                        raise ValueError
                    key, offset = int(fields[0]), int(fields[1])
                except ValueError:
                    shown = line[:80].decode("ascii", "backslashreplace").rstrip("\n")
                    raise DataFormatError(
                        self.idx_path, f"line {lineno}: expected 'key<TAB>offset', got {shown!r}", here
                    ) from None
                if not (0 <= key < 1 << 63):
                    raise DataFormatError(self.idx_path, f"line {lineno}: invalid key {key}", here)
                if not (0 <= offset and offset + 8 <= self.size):
                    raise DataFormatError(
                        self.idx_path,
                        f"line {lineno}: key {key} points to byte offset {offset}, past the end of "
                        f"{self.rec_path} ({self.size} bytes)",
                        here,
                    )
                keys.append(key)
                offsets.append(offset)
                last_line, last_ended = (lineno, line), line.endswith(b"\n")
        if not keys:
            raise DataFormatError(self.idx_path, f"index has no entries but {self.rec_path} is not empty")
        if not last_ended:  # every writer ends its lines: a file cut inside one may hold a cut offset
            self._check_last_entry(*last_line, offsets[-1])
        return np.frombuffer(keys, dtype=np.int64), np.frombuffer(offsets, dtype=np.int64)

    def _check_last_entry(self, lineno: int, line: bytes, offset: int) -> None:
        """Refuse an unterminated last line whose offset points at no record: the index was cut
        there (a read at that key blamed the .rec: 'bad magic ... not the start of a record')."""
        with open(self.rec_path, "rb") as rec:
            rec.seek(offset)
            if rec.read(4) == _MAGIC_BYTES:
                return
        shown = line.decode("ascii", "backslashreplace")
        raise DataFormatError(
            self.idx_path,
            f"its last line {lineno} ({shown!r}, without a line end) points at byte {offset} of "
            f"{self.rec_path}, where no record starts: the index was cut short (truncated copy?)",
        )

    # ---- lookups
    @property
    def keys(self) -> list[int]:
        """Keys in index-file order (like MXIndexedRecordIO.keys)."""
        return self._keys.tolist()

    def __len__(self) -> int:
        return len(self._keys)

    def _position(self, key: int) -> int:
        """Index of `key` in the sorted arrays, or -1."""
        if self._consecutive:
            i = key - self._first_key
            return i if 0 <= i < len(self._keys) else -1
        i = int(np.searchsorted(self._sorted_keys, key))
        return i if i < len(self._keys) and self._sorted_keys[i] == key else -1

    def __contains__(self, key) -> bool:
        return isinstance(key, (int, np.integer)) and self._position(int(key)) >= 0

    def missing_keys(self, keys: np.ndarray) -> np.ndarray:
        """The entries of `keys` that the index does not hold."""
        keys = np.asarray(keys, dtype=np.int64)
        i = np.minimum(np.searchsorted(self._sorted_keys, keys), len(self._keys) - 1)
        return keys[self._sorted_keys[i] != keys]

    def offset(self, key: int) -> int:
        """Byte offset of the record `key` in the .rec (KeyError if the index lacks it)."""
        i = self._position(operator.index(key))
        if i < 0:
            raise KeyError(f"key {key} is not in {self.idx_path}")
        return int(self._sorted_offsets[i])

    # ---- reading
    def _pread(self, pos: int, n: int) -> bytes:
        if self._fd is None:
            self._fd = os.open(self.rec_path, os.O_RDONLY)
        # pread has no shared file position: safe across threads and forked workers.
        return os.pread(self._fd, n, pos)

    def read(self, key: int) -> bytes:
        """The payload of record `key` (continuation parts joined)."""
        return _read_record(self._pread, self.size, self.offset(key), self.rec_path)[0]

    def read_at(self, offset: int) -> bytes:
        """The payload of the record starting at byte `offset`."""
        return _read_record(self._pread, self.size, offset, self.rec_path)[0]

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        """(key, payload) for every indexed record, in file order; streams (constant memory)."""
        if self._file_order:
            keys, offsets = self._keys, self._offsets
        else:
            order = np.argsort(self._offsets, kind="stable")
            keys, offsets = self._keys[order], self._offsets[order]
        seq = _SequentialFile(self.rec_path)
        try:
            for i in range(len(keys)):
                yield int(keys[i]), _read_record(seq.read_at, self.size, int(offsets[i]), self.rec_path)[0]
        finally:
            seq.file.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RecordIOReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fd"] = None
        return state


# --------------------------------------------------------------------------- InsightFace layout


def _class_id(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise VigfaceError(f"{what} must be an integer, got {value!r}")
    if not 0 <= value < _MAX_FLOAT32_INT:
        raise VigfaceError(f"{what} must be in [0, 2**24) (labels are stored as float32), got {value}")
    return int(value)


class FaceRecordWriter:
    """Write an InsightFace training set (`train.rec` + `train.idx`), streaming.

    `path` is the .rec path, or a directory that receives train.rec/train.idx. Images of one
    label must arrive together (the layout stores each identity as a contiguous key range).
    close() appends the identity records and the header record 0 (written last, like
    InsightFace's RecBuilder; readers find it through the index).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        idx_path: str | os.PathLike | None = None,
        fmt: str = "jpeg",
        quality: int = 95,
    ):
        path = Path(path)
        if path.suffix != ".rec":
            path = path / "train.rec"
        self.rec_path = path
        self.fmt, self.quality = fmt, quality
        self._writer = RecordIOWriter(path, idx_path)
        self.idx_path = self._writer.idx_path
        self._next_key = 1  # key 0 is the header record
        self._groups: list[tuple[int, int, int]] = []  # (label, first key, end key)
        self._seen: set[int] = set()

    @property
    def num_images(self) -> int:
        return self._next_key - 1

    def add(self, image: bytes | np.ndarray, label: int) -> int:
        """Append one image (encoded bytes, or a uint8 HWC RGB array to encode); returns its key."""
        label = _class_id(label, "label")
        if isinstance(image, np.ndarray):
            payload = encode_image(image, self.fmt, self.quality)
        else:
            payload = bytes(image)
            if sniff_image_format(payload) is None:
                raise VigfaceError(
                    f"{self.rec_path}: image for key {self._next_key} is not an encoded image "
                    f"(starts with {payload[:8].hex() or 'nothing'}); pass JPEG/PNG bytes or a uint8 array"
                )
        if not self._groups or self._groups[-1][0] != label:
            if label in self._seen:
                first = next(g for g in self._groups if g[0] == label)
                raise VigfaceError(
                    f"{self.rec_path}: images must arrive grouped by label, but label {label} reappears at "
                    f"key {self._next_key} after its group (keys {first[1]}..{first[2] - 1}) ended"
                )
            self._seen.add(label)
            self._groups.append((label, self._next_key, self._next_key))
        key = self._next_key
        if key + len(self._groups) >= _MAX_FLOAT32_INT:
            raise VigfaceError(f"{self.rec_path}: too many records for float32 identity ranges (2**24)")
        self._writer.write(key, pack_record(IRHeader(0, float(label), key, 0), payload))
        label_, first, _ = self._groups[-1]
        self._groups[-1] = (label_, first, key + 1)
        self._next_key = key + 1
        return key

    def close(self) -> None:
        """Write the identity records and header record 0, then move the files into place."""
        if self._writer.closed:
            return
        key = first_identity = self._next_key
        for _, start, end in self._groups:
            self._writer.write(key, pack_record(IRHeader(0, (start, end), key, 0)))
            key += 1
        # id2 = 1 marks the header record, as InsightFace's RecBuilder writes it.
        self._writer.write(0, pack_record(IRHeader(0, (first_identity, key), 0, 1)))
        self._writer.close()

    def abort(self) -> None:
        self._writer.abort()

    def __enter__(self) -> FaceRecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _integral(values: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(values)) and np.all(values == np.round(values)))


class FaceRecordDataset:
    """An InsightFace .rec as a map-style dataset: ds[i] -> (uint8 HWC RGB image, int label).

    Image keys come from header record 0 (keys 1..first_identity_key-1, as arcface_torch's
    MXFaceDataset reads them); without an identity header (record 0 has flag 0, or there is no
    key 0) every indexed key is an image, in index order.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.reader = RecordIOReader(rec_path, idx_path)
        self.rec_path = self.reader.rec_path
        self.identity_keys: tuple[int, int] | None = None  # [first, end) keys of identity records
        self._labels: np.ndarray | None = None
        self._ranges: np.ndarray | None = None
        self._identities_indexed = False
        header0 = None
        if 0 in self.reader:
            header0, _ = self._unpack(0)
        if header0 is not None and header0.flag > 0:
            label = header0.label
            if header0.flag < 2 or not _integral(label[:2]):
                raise DataFormatError(
                    self.rec_path,
                    f"header record 0 has label {label.tolist()}; "
                    "expected (first_identity_key, end_identity_key)",
                    self.reader.offset(0),
                )
            first, end = int(label[0]), int(label[1])
            if not 1 <= first <= end:
                raise DataFormatError(
                    self.rec_path,
                    f"header record 0 is inconsistent: identity keys [{first}, {end}) "
                    "do not follow image keys",
                    self.reader.offset(0),
                )
            self.image_keys = np.arange(1, first, dtype=np.int64)
            self.identity_keys = (first, end)
            missing = self.reader.missing_keys(self.image_keys)
            if missing.size:
                raise DataFormatError(
                    self.rec_path,
                    f"header record 0 is inconsistent: it puts images at keys 1..{first - 1} and "
                    f"identities at keys {first}..{end - 1}, but image key {int(missing[0])} is not in "
                    f"{self.reader.idx_path} ({missing.size} missing)",
                    self.reader.offset(0),
                )
            # arcface_torch needs only the image keys; an index without the identity records
            # still reads, its labels record by record
            self._identities_indexed = not self.reader.missing_keys(
                np.arange(first, end, dtype=np.int64)
            ).size
            if not self._identities_indexed:
                warnings.warn(
                    VigfaceWarning(
                        f"{self.reader.idx_path}: lacks the identity records (keys {first}..{end - 1}) "
                        "that header record 0 announces; labels are read from every image's own record"
                    ),
                    stacklevel=2,
                )
        else:
            self._refuse_index_without_header()
            self.image_keys = self.reader._keys.copy()

    def _refuse_index_without_header(self) -> None:
        """An index without key 0 that looks cut short: every key would be read as an image,
        identity records too, with wrong counts and labels and no word. vigface writes key 0's
        record and line last, so a cut index loses them first and leaves the .rec's tail unindexed;
        InsightFace's files keep the header record at offset 0."""
        reader = self.reader
        _, indexed_end = _read_record(reader._pread, reader.size, int(reader._offsets.max()), self.rec_path)
        if indexed_end < reader.size:
            raise DataFormatError(
                reader.idx_path,
                f"has no line for key 0 and indexes {self.rec_path} only up to byte {indexed_end} of "
                f"{reader.size}: the index was cut short (vigface writes key 0's line last); read as it is, "
                "records it lost would be missing and identity records would pass for images",
            )
        if np.any(reader._offsets == 0):  # the record at offset 0 is indexed under another key
            return
        try:
            header0, _ = unpack_record(reader.read_at(0), self.rec_path, 0)
        except DataFormatError:  # no record there: the reads that need one report it
            return
        label = np.atleast_1d(header0.label)
        if header0.flag >= 2 and _integral(label[:2]) and 1 <= label[0] <= label[1]:
            raise DataFormatError(
                reader.idx_path,
                f"has no line for key 0, but {self.rec_path} starts with the header record key 0 indexes "
                f"(images at keys 1..{int(label[0]) - 1}): the index is incomplete",
            )

    def _unpack(self, key: int) -> tuple[IRHeader, bytes]:
        offset = self.reader.offset(key)
        return unpack_record(self.reader.read_at(offset), self.rec_path, offset)

    def _label_of(self, header: IRHeader, key: int) -> int:
        value = header.label if header.flag == 0 else header.label[0]
        if not (np.isfinite(value) and value == round(value) and value >= 0):
            raise DataFormatError(
                self.rec_path, f"record key {key} has label {value}, not a class id", self.reader.offset(key)
            )
        return int(value)

    def __len__(self) -> int:
        return len(self.image_keys)

    def _key(self, i: int) -> int:
        i = operator.index(i)
        n = len(self.image_keys)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        return int(self.image_keys[i])

    def header(self, i: int) -> IRHeader:
        """The raw IRHeader of image i."""
        return self._unpack(self._key(i))[0]

    def encoded(self, i: int) -> tuple[bytes, int]:
        """(encoded image bytes, label) of image i, without decoding."""
        key = self._key(i)
        header, image = self._unpack(key)
        return image, self._label_of(header, key)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        key = self._key(i)
        header, image = self._unpack(key)
        return decode_image(image, self.rec_path, self.reader.offset(key)), self._label_of(header, key)

    def _is_image_key(self, key: int) -> bool:
        return self.identity_keys is None or 1 <= key < self.identity_keys[0]

    def iter_raw(self) -> Iterator[tuple[int, IRHeader, bytes]]:
        """(key, IRHeader, encoded image) for every image record, in file order, streaming."""
        for key, payload in self.reader:
            if self._is_image_key(key):
                header, image = unpack_record(payload, self.rec_path, self.reader.offset(key))
                yield key, header, image

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        """(image, label) for every image, in file order, streaming."""
        for key, header, image in self.iter_raw():
            yield decode_image(image, self.rec_path, self.reader.offset(key)), self._label_of(header, key)

    @property
    def identity_ranges(self) -> np.ndarray | None:
        """(num_identities, 2) int64 [start_key, end_key) per identity record, or None."""
        if self.identity_keys is None or not self._identities_indexed:
            return None
        if self._ranges is None:
            first, end = self.identity_keys
            ranges = np.empty((end - first, 2), dtype=np.int64)
            for row, key in enumerate(range(first, end)):
                header, _ = self._unpack(key)
                value = header.label
                bad = header.flag < 2 or not _integral(value[:2])
                if not bad:
                    start, stop = int(value[0]), int(value[1])
                    bad = not 1 <= start <= stop <= first
                if bad:
                    shown = value.tolist() if header.flag else value
                    raise DataFormatError(
                        self.rec_path,
                        f"identity record key {key} has label {shown}; expected an image key range inside "
                        f"[1, {first})",
                        self.reader.offset(key),
                    )
                ranges[row] = start, stop
            self._ranges = ranges
        return self._ranges

    @property
    def labels(self) -> np.ndarray:
        """int64 label of every image (index order)."""
        if self._labels is None:
            ranges = self.identity_ranges
            first = self.identity_keys[0] if self.identity_keys else 0
            tiles = (
                ranges is not None
                and len(ranges) > 0
                and ranges[0, 0] == 1
                and ranges[-1, 1] == first
                and np.all(ranges[1:, 0] == ranges[:-1, 1])
                and np.all(ranges[:, 1] > ranges[:, 0])
            )
            if tiles:
                # InsightFace convention: all images of an identity record share the label of its
                # first image, so reads per identity give every label. Its last image is read too, a
                # spot check: a range whose ends disagree (a set edited or merged by hand) makes the
                # whole set read record by record, as arcface_torch reads labels. A disagreeing
                # image inside a range is not caught (reading every record costs minutes on MS1M).
                first_labels = [self._label_of(self._unpack(int(k))[0], int(k)) for k in ranges[:, 0]]
                last_labels = [self._label_of(self._unpack(int(k) - 1)[0], int(k) - 1) for k in ranges[:, 1]]
                tiles = first_labels == last_labels
                if not tiles:
                    row = next(
                        i for i, (a, b) in enumerate(zip(first_labels, last_labels, strict=True)) if a != b
                    )
                    warnings.warn(
                        VigfaceWarning(
                            f"{self.rec_path}: identity record {row} spans image keys {ranges[row, 0]}.."
                            f"{ranges[row, 1] - 1}, whose first and last images have labels "
                            f"{first_labels[row]} and {last_labels[row]}; reading every image's own label"
                        ),
                        stacklevel=2,
                    )
                else:
                    self._labels = np.repeat(
                        np.asarray(first_labels, dtype=np.int64), ranges[:, 1] - ranges[:, 0]
                    )
            if not tiles:
                self._labels = np.fromiter(
                    (self._label_of(self._unpack(int(k))[0], int(k)) for k in self.image_keys),
                    dtype=np.int64,
                    count=len(self.image_keys),
                )
        return self._labels

    @property
    def num_classes(self) -> int:
        """max label + 1 (the size of a classifier head over these labels)."""
        labels = self.labels
        return int(labels.max()) + 1 if len(labels) else 0

    def close(self) -> None:
        self.reader.close()
