"""The on-disk index cache: reused when valid, rebuilt when stale or corrupt, placed where it can be written."""

import json
import logging
import os

import numpy as np
import pytest

from dcq.data import FaceRecordIO, PairSampler
from dcq.data import index_cache as ic
from dcq.data import recordio
from dcq.data.recordio import read_index, write_face_recordio


def _items(n_ids=6):
    return [(c, bytes([c, j]) * 5) for c in range(n_ids) for j in range(c % 3 + 1)]


@pytest.fixture()
def rec(tmp_path, monkeypatch):
    monkeypatch.setenv(ic.CACHE_ENV, str(tmp_path / "user-cache"))
    write_face_recordio(tmp_path / "ds", _items())
    return tmp_path / "ds" / "train.rec"


class _Builds:
    """Counts index builds (parses of the .idx and record headers)."""

    def __init__(self, monkeypatch):
        self.count = 0
        real = recordio._IndexBuilder.build

        def build(builder):
            self.count += 1
            return real(builder)

        monkeypatch.setattr(recordio._IndexBuilder, "build", build)


def _same(a: FaceRecordIO, b: FaceRecordIO):
    assert len(a) == len(b) and a.num_identities == b.num_identities and a.header0 == b.header0
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.offsets, b.offsets)
    assert [a.image_bytes(i) for i in range(len(a))] == [b.image_bytes(i) for i in range(len(b))]


def test_cache_is_written_once_and_memory_mapped_back(rec, monkeypatch):
    builds = _Builds(monkeypatch)
    first = FaceRecordIO(rec, cache=True)
    assert builds.count == 1 and (rec.parent / ".dcq-index" / "train.rec" / "index.json").is_file()
    again = FaceRecordIO(rec, cache=True)
    assert builds.count == 1  # loaded, not rebuilt
    assert isinstance(again.labels, np.memmap) and not again.labels.flags.writeable
    assert again.labels.dtype == np.int32 and again.offsets.dtype == np.int64
    _same(first, again)
    assert again.groups.order is None  # header layout: images are already sorted by identity
    a = PairSampler(again.groups, mode="identity", seed=3)
    b = PairSampler(np.asarray(FaceRecordIO(rec, cache=False).labels), mode="identity", seed=3)
    assert list(a) == list(b)


def test_pickles_memory_maps_by_file_name(rec):
    import pickle

    ds = FaceRecordIO(rec, cache=True)
    blob = pickle.dumps(ds)
    assert len(blob) < 3000  # file names, not the arrays
    clone = pickle.loads(blob)
    assert isinstance(clone.labels, np.memmap) and clone.groups.labels is clone.labels
    _same(ds, clone)
    plain = pickle.loads(pickle.dumps(FaceRecordIO(rec, cache=False)))  # in-memory arrays travel whole
    _same(ds, plain)


def test_small_sets_are_not_cached_by_default(rec):
    FaceRecordIO(rec)
    assert sorted(os.listdir(rec.parent)) == ["train.idx", "train.rec"]


@pytest.mark.parametrize("damage", ["touch_idx", "rewrite_rec", "flip_byte", "truncate", "bad_json", "version",
                                    "missing_array", "params"])
def test_stale_or_corrupt_cache_is_rebuilt_never_used(rec, monkeypatch, caplog, damage):
    good = FaceRecordIO(rec, cache=False)  # in memory: not affected by damage done to the cache files
    builds = _Builds(monkeypatch)
    FaceRecordIO(rec, cache=True)
    folder = rec.parent / ".dcq-index" / "train.rec"
    labels_npy = folder / "labels.npy"
    relabel = True
    if damage == "touch_idx":  # same content, newer modification time
        st = os.stat(rec.with_suffix(".idx"))
        os.utime(rec.with_suffix(".idx"), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    elif damage == "rewrite_rec":  # a different dataset under the same name
        write_face_recordio(rec.parent, _items(9))
    elif damage == "flip_byte":
        data = bytearray(labels_npy.read_bytes())
        data[-1] ^= 0xFF
        labels_npy.write_bytes(bytes(data))
    elif damage == "truncate":
        labels_npy.write_bytes(labels_npy.read_bytes()[:-4])
    elif damage == "bad_json":
        (folder / "index.json").write_text("{not json")
    elif damage == "version":
        meta = json.loads((folder / "index.json").read_text())
        meta["fingerprint"]["version"] = ic.VERSION + 1
        (folder / "index.json").write_text(json.dumps(meta))
    elif damage == "missing_array":
        (folder / "offsets.npy").unlink()
    elif damage == "params":
        relabel = False
    with caplog.at_level(logging.WARNING, logger="dcq.data.index_cache"):
        ds = FaceRecordIO(rec, cache=True, relabel=relabel)
    assert builds.count == 2, "an invalid cache must be rebuilt"
    assert "not using it" in caplog.text
    FaceRecordIO(rec, cache=True, relabel=relabel)
    assert builds.count == 2, "the rebuilt cache is valid again"
    _same(ds, FaceRecordIO(rec, cache=False, relabel=relabel))
    if damage != "rewrite_rec":
        _same(ds, good)


def test_unwritable_dataset_folder_uses_the_user_cache(rec, monkeypatch, tmp_path):
    """Permission-independent: the writability check says no, as it does for a read-only mount."""
    builds = _Builds(monkeypatch)
    monkeypatch.setattr(ic, "_writable", lambda folder: False)
    ds = FaceRecordIO(rec, cache=True)
    assert sorted(os.listdir(rec.parent)) == ["train.idx", "train.rec"]
    assert ds.index_cache.location.parent == tmp_path / "user-cache"
    again = FaceRecordIO(rec, cache=True)
    assert builds.count == 1
    _same(ds, again)


def test_read_only_dataset_folder(rec, tmp_path):
    os.chmod(rec.parent, 0o555)
    try:
        ds = FaceRecordIO(rec, cache=True)
        _same(ds, FaceRecordIO(rec, cache=False))
        listing = sorted(os.listdir(rec.parent))
    finally:
        os.chmod(rec.parent, 0o755)
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod does not stop root from writing, so only the reading was checked")
    assert listing == ["train.idx", "train.rec"]
    assert ds.index_cache.location.parent == tmp_path / "user-cache"


def test_no_writable_place_still_works(rec, monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv(ic.CACHE_ENV, str(blocker / "sub"))
    monkeypatch.setattr(ic, "_writable", lambda folder: False)
    with caplog.at_level(logging.WARNING, logger="dcq.data.index_cache"):
        ds = FaceRecordIO(rec, cache=True)
    assert ds.index_cache.location is None and "no writable place" in caplog.text
    _same(ds, FaceRecordIO(rec, cache=False))


def test_index_parses_the_same_in_small_blocks(tmp_path):
    rng = np.random.default_rng(0)
    keys = rng.permutation(500)
    offs = np.arange(500) * 4096 + 8
    idx = tmp_path / "a.idx"
    idx.write_text("".join(f"{k}\t{o}\n" for k, o in zip(keys, offs)) + "\n\n")
    for block in (1, 7, 64, 1 << 20):
        k, o = read_index(idx, block=block)
        assert k.tolist() == keys.tolist() and o.tolist() == offs.tolist()
    lines = idx.read_text().splitlines()
    lines.insert(300, "")  # a blank line in the middle is an error, wherever the blocks fall
    (tmp_path / "b.idx").write_text("\n".join(lines) + "\n")
    for block in (5, 64, 1 << 20):
        with pytest.raises(recordio.DcqError, match="line 301 .* is empty"):
            read_index(tmp_path / "b.idx", block=block)
    lines[300] = "12\tx"
    (tmp_path / "c.idx").write_text("\n".join(lines) + "\n")
    for block in (5, 64, 1 << 20):
        with pytest.raises(recordio.DcqError, match=r"c.idx: line 301 \(byte \d+\) is b'12\\tx'"):
            read_index(tmp_path / "c.idx", block=block)
    (tmp_path / "d.idx").write_text("1\t0\n2\t4\n1\t8\n")
    with pytest.raises(recordio.DcqError, match="key 1 appears twice"):
        read_index(tmp_path / "d.idx")
