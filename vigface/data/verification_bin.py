"""Verification `.bin` files (lfw.bin, cfp_fp.bin, agedb_30.bin, ...) as InsightFace ships them.

A .bin is a pickle of `(list_of_encoded_images, issame)`: 2*P encoded images (pair p is images
2p and 2p+1) and P booleans. The public files were pickled by Python 2 (load with
encoding="bytes") or by Python 3 with protocol 2-4; some hold issame as a numpy bool array.

Pickle runs code named in the file, so `read_bin` never uses plain pickle.load: its unpickler
resolves only the few globals those files need, and only to harmless stand-ins (numpy arrays
are rebuilt from their raw bytes by us, not by numpy's unpickling hooks).
"""

from __future__ import annotations

import io
import math
import os
import pickle
from pathlib import Path

import numpy as np

from vigface.data.images import decode_image, sniff_image_format
from vigface.errors import DataFormatError, VigfaceError

_LATIN1 = ("latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1", "l1")
_BOOL_DTYPES = ("b1", "?", "bool")


class _Refused(Exception):
    """A global or argument outside what a verification .bin needs."""


# ---- stand-ins for the globals a .bin may name ----------------------------------------------


class _NdarrayType:
    """Stands for numpy.ndarray; only ever passed to _reconstruct."""


_NDARRAY = _NdarrayType()


class _DtypeStub:
    """numpy.dtype(obj, align, copy) restricted to bool; BUILD's state is recorded, not applied."""

    def __init__(self, obj, align=False, copy=True):
        name = obj.decode("ascii", "replace") if isinstance(obj, bytes) else obj
        if name not in _BOOL_DTYPES:
            raise _Refused(f"numpy.dtype({obj!r}): only bool arrays are allowed")
        self.state = None

    def __setstate__(self, state):
        self.state = state

    def check(self) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags) of a plain bool dtype.
        state = self.state
        if state is not None and (not isinstance(state, tuple) or len(state) < 5 or any(state[2:5])):
            raise _Refused("numpy.dtype state describes a structured or sub-array dtype")


class _ArrayStub:
    """numpy.core.multiarray._reconstruct(ndarray, ...) result; BUILD fills in its state."""

    def __init__(self):
        self.state = None

    def __setstate__(self, state):
        self.state = state

    def to_array(self) -> np.ndarray:
        state = self.state
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _Refused("ndarray state is not a 4- or 5-tuple")
        shape, dtype, _fortran, raw = state[-4:]
        return _bool_array(raw, dtype, shape)


def _bool_array(raw, dtype, shape) -> np.ndarray:
    """A bool array from its raw bytes, after checking every part of the description."""
    if not isinstance(dtype, _DtypeStub):
        raise _Refused("array dtype is not numpy.dtype('bool')")
    dtype.check()
    if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)):
        raise _Refused(f"array shape {shape!r} is not a tuple of sizes")
    if isinstance(raw, str):
        raw = raw.encode("latin-1")  # Python 2 str data loaded as text
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != math.prod(shape):
        raise _Refused("array data does not match its shape")
    return (np.frombuffer(bytes(raw), dtype=np.uint8) != 0).reshape(shape)


def _reconstruct(subtype, shape, typecode):
    if subtype is not _NDARRAY:
        raise _Refused("_reconstruct may only build numpy.ndarray")
    return _ArrayStub()


def _scalar(dtype, raw=None):
    """numpy.core.multiarray.scalar for a numpy bool (issame lists of np.bool_)."""
    if isinstance(raw, str):
        raw = raw.encode("latin-1")
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != 1:
        raise _Refused("numpy scalar data is not one byte")
    return bool(_bool_array(raw, dtype, (1,))[0])


def _frombuffer(buf, dtype, shape, order="C"):
    """numpy.core.numeric._frombuffer: how protocol 5 pickles arrays."""
    if isinstance(buf, pickle.PickleBuffer):
        buf = bytes(buf)
    return _bool_array(buf, dtype, shape)


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    """_codecs.encode as protocol 2 uses it to carry bytes: (text, 'latin1') only."""
    if not isinstance(obj, str) or encoding.lower() not in _LATIN1:
        raise _Refused("_codecs.encode is only allowed as the latin-1 bytes trick")
    return obj.encode("latin-1")


def _bytes_like(kind):
    # bytes(n) / bytearray(n) would allocate n bytes: only data-carrying forms are allowed.
    def make(*args):
        if not args:
            return kind()
        if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
            return kind(args[0])
        if len(args) == 2 and isinstance(args[0], str) and str(args[1]).lower() in _LATIN1:
            return kind(args[0], "latin-1")
        raise _Refused(f"{kind.__name__}() with arguments other than bytes or latin-1 text")

    return make


_ALLOWED = {
    ("_codecs", "encode"): _codecs_encode,
    ("builtins", "bytes"): _bytes_like(bytes),
    ("__builtin__", "bytes"): _bytes_like(bytes),
    ("builtins", "bytearray"): _bytes_like(bytearray),
    ("__builtin__", "bytearray"): _bytes_like(bytearray),
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DtypeStub,
}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[_module, "_reconstruct"] = _reconstruct
    _ALLOWED[_module, "scalar"] = _scalar
for _module in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED[_module, "_frombuffer"] = _frombuffer


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: Path):
        super().__init__(io.BytesIO(data), encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[module, name]
        except KeyError:
            raise DataFormatError(
                self.path,
                f"refused to unpickle global {module}.{name}: a verification .bin holds only encoded "
                "images (bytes) and booleans",
            ) from None


# ---- reading ------------------------------------------------------------------------------


def _as_bool(value, path: Path, index: int) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise DataFormatError(path, f"issame[{index}] is {value!r}, not a boolean")


def read_bin(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
    """Load a verification .bin -> (2P encoded images, bool array of P issame flags)."""
    path = Path(path)
    try:
        if path.exists() and not path.is_file() and not path.is_dir():  # a pipe: the read would block
            raise DataFormatError(path, "not a regular file (a verification .bin is)")
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataFormatError(path, "no such verification .bin file") from None
    except IsADirectoryError:
        raise DataFormatError(
            path, "is a folder, not a verification .bin (pickled image pairs, like lfw.bin or toy_val.bin)"
        ) from None
    if not data:
        raise DataFormatError(path, "empty file", 0)
    try:
        obj = _RestrictedUnpickler(data, path).load()
    except DataFormatError:
        raise
    except _Refused as exc:
        raise DataFormatError(path, f"refused to unpickle: {exc}") from None
    except Exception as exc:  # UnpicklingError, EOFError, ValueError, MemoryError, ...
        raise DataFormatError(path, f"not a valid pickle: {type(exc).__name__}: {exc}") from None

    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise DataFormatError(path, f"expected a pickled pair (images, issame), got {type(obj).__name__}")
    images, issame = obj
    if not isinstance(images, (list, tuple)):
        raise DataFormatError(path, f"images must be a list of bytes, got {type(images).__name__}")
    for i, image in enumerate(images):
        if not isinstance(image, (bytes, bytearray)):
            raise DataFormatError(path, f"image {i} is {type(image).__name__}, not bytes")
    try:
        if isinstance(issame, _ArrayStub):
            issame = issame.to_array()
    except _Refused as exc:
        raise DataFormatError(path, f"refused to unpickle: {exc}") from None
    if isinstance(issame, np.ndarray):
        if issame.ndim != 1:
            raise DataFormatError(path, f"issame must be one-dimensional, got shape {issame.shape}")
        flags = issame
    elif isinstance(issame, (list, tuple)):
        flags = np.array([_as_bool(v, path, i) for i, v in enumerate(issame)], dtype=bool)
    else:
        raise DataFormatError(path, f"issame must be a list or bool array, got {type(issame).__name__}")
    if len(images) != 2 * len(flags):
        raise DataFormatError(
            path, f"{len(images)} images for {len(flags)} pairs; a .bin holds exactly 2 images per pair"
        )
    return [bytes(image) for image in images], flags


def load_verification_pairs(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """read_bin + decode: (uint8 images (2P, H, W, 3), bool issame (P,))."""
    encoded, issame = read_bin(path)
    images = None
    for i, data in enumerate(encoded):
        image = decode_image(data, path, what=f"image {i} (pair {i // 2})")
        if images is None:
            images = np.empty((len(encoded), *image.shape), dtype=np.uint8)
        elif image.shape != images.shape[1:]:
            raise DataFormatError(
                path, f"image {i} (pair {i // 2}) has shape {image.shape}, image 0 has {images.shape[1:]}"
            )
        images[i] = image
    if images is None:
        images = np.empty((0, 0, 0, 3), dtype=np.uint8)
    return images, issame


# ---- writing ------------------------------------------------------------------------------


def write_bin(path: str | os.PathLike, images, issame, *, protocol: int = 4) -> None:
    """Write a verification .bin that InsightFace's `pickle.load(f, encoding="bytes")` reads.

    `images`: 2P encoded images (bytes); `issame`: P booleans. Written to a temporary file and
    renamed, so the target is either the old file or the complete new one.
    """
    path = Path(path)
    images = list(images)
    flags = list(np.asarray(issame).reshape(-1)) if isinstance(issame, np.ndarray) else list(issame)
    if len(images) != 2 * len(flags):
        raise VigfaceError(
            f"{path}: {len(images)} images for {len(flags)} pairs; need exactly 2 images per pair"
        )
    payload = []
    for i, image in enumerate(images):
        if not isinstance(image, (bytes, bytearray, memoryview)) or sniff_image_format(image) is None:
            raise VigfaceError(f"{path}: image {i} is not an encoded image (bytes of a JPEG/PNG)")
        payload.append(bytes(image))
    checked = []
    for i, value in enumerate(flags):
        if not (
            isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1))
        ):
            raise VigfaceError(f"{path}: issame[{i}] is {value!r}, not a boolean")
        checked.append(bool(value))  # plain bools: the list InsightFace's own .bin files hold

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            pickle.dump((payload, checked), f, protocol=protocol)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
