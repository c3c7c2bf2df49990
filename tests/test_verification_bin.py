"""Verification .bin read/write, including python-2 pickles and hostile pickles that must not run."""

import os
import pickle

import numpy as np
import pytest

from dcq.data import read_bin, write_bin
from dcq.errors import DcqError


def test_round_trip(tmp_path):
    images = [bytes([i]) * (i + 1) for i in range(6)] + [b""]
    images = images[:6]
    issame = [True, False, True]
    path = tmp_path / "sub" / "val.bin"
    write_bin(path, images, issame)
    got, flags = read_bin(path)
    assert got == images
    assert flags.dtype == bool and flags.tolist() == issame
    assert os.listdir(path.parent) == ["val.bin"]  # temp file renamed, nothing left behind


def test_reads_insightface_style_python3_pickle_with_numpy_flags(tmp_path):
    images = [b"\xff\xd8a", b"\xff\xd8b", b"c", b"d"]
    for proto in (2, 4, 5):
        path = tmp_path / f"p{proto}.bin"
        with open(path, "wb") as f:
            pickle.dump((images, np.array([True, False])), f, protocol=proto)
        got, flags = read_bin(path)
        assert got == images and flags.tolist() == [True, False]
        with open(path, "wb") as f:  # numpy bool scalars in a plain list
            pickle.dump((images, [np.bool_(False), np.bool_(True)]), f, protocol=proto)
        assert read_bin(path)[1].tolist() == [False, True]


def test_reads_python2_pickle_of_str_images(tmp_path):
    # Hand-written protocol-2 stream as python 2 produces it: images are py2 `str` (SHORT_BINSTRING).
    stream = (
        b"\x80\x02("  # PROTO 2, MARK
        b"U\x04\xff\xd8\x00\x01U\x02ab"  # two py2 str images
        b"U\x01cU\x00"  # two more
        b"l(\x88\x89l\x86."  # LIST, MARK, True, False, LIST, TUPLE2, STOP
    )
    path = tmp_path / "py2.bin"
    path.write_bytes(stream)
    images, flags = read_bin(path)
    assert images == [b"\xff\xd8\x00\x01", b"ab", b"c", b""]
    assert flags.tolist() == [True, False]


class _RunsShell:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


class _OpensFile:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


@pytest.mark.parametrize("payload_cls,refused", [(_RunsShell, "system"), (_OpensFile, "open")])
def test_hostile_pickle_is_refused_and_does_nothing(tmp_path, payload_cls, refused):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump(([b"a", payload_cls(target)], [True]), f, protocol=2)
    with pytest.raises(DcqError) as err:
        read_bin(path)
    msg = str(err.value)
    assert str(path) in msg and refused in msg and "refused" in msg
    assert "\n" not in msg
    assert not target.exists()


def test_codecs_encode_only_for_latin1(tmp_path):
    # _codecs.encode is admitted (py3 protocol-2 bytes) but must not become a general codec gadget.
    stream = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    path = tmp_path / "codec.bin"
    path.write_bytes(stream)
    with pytest.raises(DcqError, match="not a readable verification .bin"):
        read_bin(path)


def test_structure_errors(tmp_path):
    path = tmp_path / "bad.bin"
    with open(path, "wb") as f:
        pickle.dump(([b"a", b"b", b"c"], [True, False]), f)
    with pytest.raises(DcqError, match="3 images but 2 issame"):
        read_bin(path)
    with open(path, "wb") as f:
        pickle.dump([b"a"], f)
    with pytest.raises(DcqError, match="expected a pickled pair"):
        read_bin(path)
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(DcqError, match="bad.bin"):
        read_bin(path)
    with pytest.raises(DcqError, match="not found"):
        read_bin(tmp_path / "missing.bin")
    with pytest.raises(DcqError, match="2 images per issame"):
        write_bin(tmp_path / "w.bin", [b"a"], [True])
