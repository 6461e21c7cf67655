"""Verification .bin: round trip, the pickle flavours real files use, and a restricted unpickler."""

import builtins
import os
import pickle
import struct
import subprocess

import numpy as np
import pytest

from vigface.data.images import encode_image
from vigface.data.verification_bin import load_verification_pairs, read_bin, write_bin
from vigface.errors import DataFormatError, VigfaceError


def jpegs(n, size=8):
    rng = np.random.default_rng(n)
    return [encode_image(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "jpeg") for _ in range(n)]


def test_round_trip(tmp_path):
    images, issame = jpegs(6), [True, False, True]
    write_bin(tmp_path / "v.bin", images, issame)
    got, flags = read_bin(tmp_path / "v.bin")
    assert got == images and all(type(b) is bytes for b in got)
    assert flags.dtype == bool and flags.tolist() == issame
    assert os.listdir(tmp_path) == ["v.bin"]  # no temporary file left behind
    # InsightFace's own loader reads it.
    with open(tmp_path / "v.bin", "rb") as f:
        bins, issame_list = pickle.load(f, encoding="bytes")
    assert bins == images and issame_list == issame

    decoded, flags = load_verification_pairs(tmp_path / "v.bin")
    assert decoded.shape == (6, 8, 8, 3) and decoded.dtype == np.uint8 and flags.tolist() == issame


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy_bool_issame_any_protocol(tmp_path, protocol):
    images, issame = jpegs(4), np.array([False, True])
    (tmp_path / "n.bin").write_bytes(pickle.dumps((images, issame), protocol=protocol))
    got, flags = read_bin(tmp_path / "n.bin")
    assert got == images and flags.tolist() == [False, True]


def test_protocol2_bytes_and_numpy_bool_scalars(tmp_path):
    # Protocol 2 from Python 3 carries bytes as _codecs.encode(text, "latin1"), b"" as bytes().
    images = [*jpegs(2), bytearray(jpegs(1)[0]), jpegs(1)[0]]
    issame = [np.bool_(True), np.bool_(False)]
    data = pickle.dumps((images, issame), protocol=2)
    assert b"_codecs" in data and b"scalar" in data
    (tmp_path / "p2.bin").write_bytes(data)
    got, flags = read_bin(tmp_path / "p2.bin")
    assert got == [bytes(b) for b in images] and flags.tolist() == [True, False]


def short_binstring(b):
    return b"U" + bytes([len(b)]) + b


def test_python2_style_pickle(tmp_path):
    """What Python 2 writes: str images (SHORT_BINSTRING), and a py2-numpy bool array."""
    images = jpegs(4)
    images = [b[:200] for b in images]  # payloads only need to be bytes here
    body = b"\x80\x02]("
    for b in images:
        body += short_binstring(b)
    body += b"e"
    # numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), 'b') then BUILD with the state
    # (1, (2,), dtype('b1'), False, '\x01\x00') -- how Python 2 numpy pickles a bool array.
    body += (
        b"cnumpy.core.multiarray\n_reconstruct\n"
        + b"cnumpy\nndarray\n"
        + b"K\x00\x85"
        + short_binstring(b"b")
    )
    body += b"\x87R("  # TUPLE3 REDUCE, MARK for the state tuple
    body += b"K\x01K\x02\x85"  # version 1, shape (2,)
    body += b"cnumpy\ndtype\n" + short_binstring(b"b1") + b"K\x00K\x01\x87R"  # dtype('b1', 0, 1)
    body += b"(K\x03" + short_binstring(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"  # dtype state
    body += b"\x89" + short_binstring(b"\x01\x00") + b"tb"  # is_fortran, raw data; BUILD
    body += b"\x86."  # TUPLE2 STOP
    (tmp_path / "py2.bin").write_bytes(body)
    got, flags = read_bin(tmp_path / "py2.bin")
    assert got == images and flags.tolist() == [True, False]

    # And the plain list-of-bools flavour (lfw.bin as InsightFace made it).
    body = b"\x80\x02](" + b"".join(short_binstring(b) for b in images) + b"e](\x88\x89e\x86."
    (tmp_path / "py2list.bin").write_bytes(body)
    got, flags = read_bin(tmp_path / "py2list.bin")
    assert got == images and flags.tolist() == [True, False]


class _Reduce:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize(
    "make_evil, name",
    [
        (lambda m: _Reduce(os.system, f"touch {m}"), "system"),
        (lambda m: _Reduce(builtins.eval, f"open({str(m)!r}, 'w').close()"), "eval"),
        (lambda m: _Reduce(subprocess.Popen, ["touch", str(m)]), "Popen"),
        (lambda m: _Reduce(builtins.exec, f"open({str(m)!r}, 'w').close()"), "exec"),
    ],
)
def test_malicious_pickles_are_refused_without_side_effects(tmp_path, make_evil, name):
    marker = tmp_path / "pwned"
    for obj in (make_evil(marker), (jpegs(2), [make_evil(marker)])):
        (tmp_path / "evil.bin").write_bytes(pickle.dumps(obj, protocol=2))
        with pytest.raises(DataFormatError, match=f"refused to unpickle global .*{name}") as info:
            read_bin(tmp_path / "evil.bin")
        assert str(tmp_path / "evil.bin") in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "evil, match",
    [
        (_Reduce(bytearray, 10**12), "bytearray"),  # a terabyte allocation
        (_Reduce(bytes, 10**12), "bytes"),
        (_Reduce(np.dtype, "O"), "only bool"),
        (_Reduce(__import__("_codecs").encode, "abc", "rot13"), "latin-1"),
        (np.array([1.5, 2.5]), "only bool"),  # numpy, but not a bool array
        (np.array([b"x"], dtype=object), "only bool"),
    ],
)
def test_allowed_globals_are_restricted_to_harmless_uses(tmp_path, evil, match):
    (tmp_path / "e.bin").write_bytes(pickle.dumps((jpegs(2), evil), protocol=2))
    with pytest.raises(DataFormatError, match=match):
        read_bin(tmp_path / "e.bin")


@pytest.mark.parametrize(
    "obj, match",
    [
        ({"images": []}, "expected a pickled pair"),
        ((b"a", b"b", [True]), "expected a pickled pair"),
        ((b"abcd", [True]), "images must be a list"),
        (([1, 2], [True]), "image 0 is int"),
        (([b"a", b"b"], ["yes"]), r"issame\[0\] is b?'yes'"),
        (([b"a", b"b"], [2]), r"issame\[0\] is 2"),
        (([b"a", b"b", b"c"], [True]), "3 images for 1 pairs"),
        (([b"a", b"b"], np.array([[True]])), "one-dimensional"),
    ],
)
def test_wrong_structure_is_refused(tmp_path, obj, match):
    (tmp_path / "s.bin").write_bytes(pickle.dumps(obj, protocol=4))
    with pytest.raises(DataFormatError, match=match):
        read_bin(tmp_path / "s.bin")


def test_not_a_pickle(tmp_path):
    for name, data, match in [
        ("empty.bin", b"", "empty file"),
        ("garbage.bin", b"\x00garbage", "not a valid pickle"),
        ("truncated.bin", pickle.dumps((jpegs(2), [True]), protocol=4)[:-40], "not a valid pickle"),
        ("huge.bin", b"\x80\x04\x8e" + struct.pack("<Q", 2**62) + b"x", "not a valid pickle"),
    ]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataFormatError, match=match) as info:
            read_bin(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)
    with pytest.raises(DataFormatError, match="no such"):
        read_bin(tmp_path / "absent.bin")
    # a folder of images (what a researcher may hold out) is named as such, not "Is a directory"
    with pytest.raises(DataFormatError, match="is a folder, not a verification .bin"):
        read_bin(tmp_path)


def test_bad_image_names_the_pair(tmp_path):
    images = jpegs(4)
    images[3] = b"\xff\xd8\xff not really a jpeg"
    write_bin(tmp_path / "b.bin", images, [True, False])
    with pytest.raises(DataFormatError, match=r"image 3 \(pair 1\).*not a decodable image") as info:
        load_verification_pairs(tmp_path / "b.bin")
    assert str(tmp_path / "b.bin") in str(info.value)


def test_write_validates(tmp_path):
    with pytest.raises(VigfaceError, match="3 images for 1 pairs"):
        write_bin(tmp_path / "w.bin", jpegs(3), [True])
    with pytest.raises(VigfaceError, match="image 1 is not an encoded image"):
        write_bin(tmp_path / "w.bin", [jpegs(1)[0], b"text"], [True])
    with pytest.raises(VigfaceError, match=r"issame\[0\]"):
        write_bin(tmp_path / "w.bin", jpegs(2), ["maybe"])
    assert os.listdir(tmp_path) == []
    write_bin(tmp_path / "w.bin", jpegs(2), np.array([True]))
    assert read_bin(tmp_path / "w.bin")[1].tolist() == [True]
