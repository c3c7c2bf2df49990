"""insightface RecordIO: byte layout, multi-part records, both dataset layouts, error messages."""

import io
import os
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from dcq.data import FaceRecordIO, RecordIOWriter, pack_record, unpack_record
from dcq.data.recordio import MAGIC, RecordReader, read_index, rebuild_index, write_face_recordio
from dcq.errors import DcqError

M = struct.pack("<I", MAGIC)


def _jpeg(seed: int, size: int = 8) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_pack_unpack_match_mxnet_layout():
    p = pack_record(7, b"IMG", id=3, id2=4)
    assert p == struct.pack("<IfQQ", 0, 7.0, 3, 4) + b"IMG"
    h, img = unpack_record(p)
    assert (h.flag, h.label, h.id, h.id2, img) == (0, 7.0, 3, 4, b"IMG")
    p = pack_record(0, b"X", extra_labels=[5, 9.5])
    assert p == struct.pack("<IfQQ", 2, 0.0, 0, 0) + np.array([5, 9.5], "<f4").tobytes() + b"X"
    h, img = unpack_record(p)
    assert h.flag == 2 and h.label.tolist() == [5.0, 9.5] and img == b"X"
    assert unpack_record(pack_record([1, 2, 3], b""))[0].flag == 3  # a sequence label means flag>0
    with pytest.raises(DcqError, match="shorter"):
        unpack_record(b"\0" * 10)


def test_writer_bytes_and_index(tmp_path):
    rec, idx = tmp_path / "a.rec", tmp_path / "a.idx"
    with RecordIOWriter(rec, idx) as w:
        w.write(5, b"abcde")
        w.write(2, b"")
        w.write(9, b"wxyz")
    raw = rec.read_bytes()
    assert raw == (M + struct.pack("<I", 5) + b"abcde\0\0\0" + M + struct.pack("<I", 0)
                   + M + struct.pack("<I", 4) + b"wxyz")
    assert idx.read_text() == "5\t0\n2\t16\n9\t24\n"
    keys, offs = read_index(idx, len(raw))
    assert keys.tolist() == [5, 2, 9] and offs.tolist() == [0, 16, 24]


def _parts(raw: bytes):
    """(cflag, length) of every physical part in a .rec."""
    out, pos = [], 0
    while pos < len(raw):
        magic, lrec = struct.unpack_from("<II", raw, pos)
        assert magic == MAGIC
        n = lrec & ((1 << 29) - 1)
        out.append((lrec >> 29, n))
        pos += 8 + n + (-n % 4)
    return out


def test_multipart_records_split_at_aligned_magic_and_round_trip(tmp_path):
    payloads = [
        M + b"abcd" + M + M + b"ef",            # magic at 0, 8, 12
        b"1234" + M,                           # magic as the last aligned word
        b"12" + M + b"34",                     # unaligned: not split
        M,                                     # only the magic
        b"xyzw" * 3 + M + b"tail!",            # once in the middle
    ]
    rec, idx = tmp_path / "m.rec", tmp_path / "m.idx"
    with RecordIOWriter(rec, idx) as w:
        for k, p in enumerate(payloads):
            w.write(k, p)
    parts = _parts(rec.read_bytes())
    assert parts == [(1, 0), (2, 4), (2, 0), (3, 2),
                     (1, 4), (3, 0),
                     (0, 8),
                     (1, 0), (3, 0),
                     (1, 12), (3, 5)]
    # the magic number is never stored inside a part at an aligned offset of the payload
    reader = RecordReader(rec)  # the byte-level reader, no dataset labels involved
    _, offs = read_index(idx)
    assert [reader.read(int(o), "t") for o in offs] == payloads
    heads = reader.read_heads(offs)  # framing of each record's first part, read in one go
    assert heads["magic"].tolist() == [MAGIC] * 5 and (heads["lrec"] >> 29).tolist() == [1, 1, 0, 1, 1]
    assert np.array_equal(reader.read_heads(offs[::-1], gap=0), heads[::-1])  # any order, one pread each
    assert rebuild_index(rec, tmp_path / "re.idx") == len(payloads)
    assert (tmp_path / "re.idx").read_text() == idx.read_text()


def test_header_layout_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    counts = [3, 1, 0, 4, 2]
    items = [(c, _jpeg(100 * c + j) + (M * int(rng.integers(0, 3)))) for c, n in enumerate(counts) for j in range(n)]
    info = write_face_recordio(tmp_path, items)
    assert info["images"] == 10 and info["identities"] == 5
    ds = FaceRecordIO(tmp_path / "train.rec")
    assert ds.header0 == (11, 16)
    assert len(ds) == 10 and ds.num_identities == 5
    assert ds.labels.dtype == np.int32 and ds.offsets.dtype == np.int64  # the narrowest that fit
    assert ds.labels.tolist() == [lab for lab, _ in items]
    assert [ds.image_bytes(i) for i in range(10)] == [b for _, b in items]
    assert ds.indices_of(3).tolist() == [4, 5, 6, 7] and ds.indices_of(2).size == 0
    assert ds.identity_ranges.tolist() == [[1, 4], [4, 5], [5, 5], [5, 9], [9, 11]]
    assert ds.identity_names is None
    assert ds.label(-1) == 4 and ds[1] == (items[1][1], 0)
    assert ds.image(0).shape == (8, 8, 3) and ds.image(0, 4).shape == (4, 4, 3)
    with pytest.raises(IndexError):
        ds.label(10)
    # identities without images still count (their identity records have empty ranges)
    write_face_recordio(tmp_path / "e", items, num_identities=7)
    ds = FaceRecordIO(tmp_path / "e" / "train.rec")
    assert ds.num_identities == 7 and ds.indices_of(6).size == 0 and ds.labels.tolist() == [lab for lab, _ in items]


def test_insightface_written_header_layout(tmp_path):
    """face2rec-style: image labels as flag-2 extra labels, identity records and record 0 written last."""
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    imgs = [_jpeg(i) for i in range(5)]
    labels = [0, 0, 1, 1, 1]
    with RecordIOWriter(rec, idx) as w:
        for k, (lab, b) in enumerate(zip(labels, imgs), start=1):
            w.write(k, pack_record(0, b, extra_labels=[lab, 0]))
        w.write(6, pack_record(0, b"", extra_labels=[1, 3]))
        w.write(7, pack_record(0, b"", extra_labels=[3, 6]))
        w.write(0, pack_record(0, b"", extra_labels=[6, 8]))
    ds = FaceRecordIO(rec)
    assert ds.header0 == (6, 8) and ds.labels.tolist() == labels
    assert [ds.image_bytes(i) for i in range(5)] == imgs
    assert ds.indices_of(1).tolist() == [2, 3, 4]


def test_header_ranges_disagreeing_with_image_labels_fall_back_to_image_labels(tmp_path):
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    with RecordIOWriter(rec, idx) as w:
        for k, lab in enumerate([0, 1, 1], start=1):
            w.write(k, pack_record(lab, _jpeg(k)))
        w.write(4, pack_record(0, b"", extra_labels=[1, 3]))  # wrong: says 2 images for identity 0
        w.write(5, pack_record(0, b"", extra_labels=[3, 4]))
        w.write(0, pack_record(0, b"", extra_labels=[4, 6]))
    ds = FaceRecordIO(rec)
    assert ds.labels.tolist() == [0, 1, 1]


def test_plain_layout_relabels_non_contiguous_labels(tmp_path):
    raw = [10, 3, 7, 3, 10, 7, 7]
    imgs = [_jpeg(i) + (M if i % 2 else b"") for i in range(len(raw))]
    rec, idx = tmp_path / "p.rec", tmp_path / "p.idx"
    keys = [40, 2, 17, 5, 8, 100, 1]  # arbitrary keys; dataset order = .idx order
    with RecordIOWriter(rec, idx) as w:
        for k, lab, b in zip(keys, raw, imgs):
            w.write(k, pack_record(lab, b))
    ds = FaceRecordIO(rec, idx)
    assert ds.header0 is None
    assert ds.raw_labels.tolist() == raw
    assert ds.labels.tolist() == [2, 0, 1, 0, 2, 1, 1]
    assert ds.label_values.tolist() == [3, 7, 10]
    assert ds.num_identities == 3
    assert [ds.image_bytes(i) for i in range(len(raw))] == imgs
    assert ds.image_keys.tolist() == keys
    kept = FaceRecordIO(rec, idx, relabel=False)
    assert kept.labels.tolist() == raw
    out = write_face_recordio(tmp_path / "w", [(lab, b) for lab, b in zip(raw, imgs)], name="probe", header=False)
    ds2 = FaceRecordIO(out["rec"], relabel=False)
    assert ds2.labels.tolist() == raw and [ds2.image_bytes(i) for i in range(7)] == imgs


def test_pickle_and_reopen_after_fork(tmp_path):
    write_face_recordio(tmp_path, [(0, _jpeg(1)), (1, _jpeg(2))])
    ds = FaceRecordIO(tmp_path / "train.rec")
    ds.image_bytes(0)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.reader._fd is None and clone.image_bytes(1) == ds.image_bytes(1)
    ds.reader._pid = -1  # as if this object had been inherited by a forked worker
    old_fd = ds.reader._fd
    assert ds.image_bytes(0) == _jpeg(1) and ds.reader._fd != old_fd


def test_errors_name_file_record_and_offset(tmp_path):
    items = [(0, _jpeg(1)), (0, b"not an image at all"), (1, _jpeg(3))]
    write_face_recordio(tmp_path, items)
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"

    ds = FaceRecordIO(rec)
    off = int(ds.offsets[1])
    where = rf"train.rec image 1 \(record key 2\) at byte offset {off}\)"
    with pytest.raises(DcqError, match=rf"cannot decode image .*{where}"):
        ds.image(1)

    os.rename(idx, tmp_path / "moved.idx")
    with pytest.raises(DcqError, match="train.idx: index file not found"):
        FaceRecordIO(rec)
    os.rename(tmp_path / "moved.idx", idx)

    # an offset that lands inside a record: bad magic, named with record and offset
    lines = idx.read_text().splitlines()
    key, o = lines[1].split("\t")
    lines[1] = f"{key}\t{int(o) + 8}"
    (tmp_path / "bad.idx").write_text("\n".join(lines) + "\n")
    bad_magic = rf"train.rec: image 1 \(record key 2\): bad magic 0x[0-9a-f]+ at byte offset {int(o) + 8}"
    with pytest.raises(DcqError, match=bad_magic):
        FaceRecordIO(rec, tmp_path / "bad.idx")  # the header layout checks image labels when opening

    (tmp_path / "junk.idx").write_text("0\t0\n1\tabc\n")
    with pytest.raises(DcqError, match=r"junk.idx: line 2 \(byte 4\)"):
        FaceRecordIO(rec, tmp_path / "junk.idx")
    (tmp_path / "far.idx").write_text(f"0\t{10 ** 9}\n")
    with pytest.raises(DcqError, match="far.idx: line 1 .*byte offset 1000000000"):
        FaceRecordIO(rec, tmp_path / "far.idx")

    # truncated: cut the file inside the last image record (plain layout so nothing else is read first)
    out = write_face_recordio(tmp_path / "p", items, header=False)
    prec = out["rec"]
    with open(prec, "rb") as f:
        data = f.read()
    last_off = int(read_index(out["idx"])[1][-1])
    with open(prec, "wb") as f:
        f.write(data[: last_off + 40])
    ds = FaceRecordIO(prec)
    truncated = rf"train.rec: image 2 \(record key 2\): truncated record at byte offset {last_off}"
    with pytest.raises(DcqError, match=truncated):
        ds.image_bytes(2)
    with open(prec, "wb") as f:
        f.write(data[: last_off + 4])
    with pytest.raises(DcqError, match=rf"image 2 .*byte offset {last_off}"):
        FaceRecordIO(prec)


def test_writer_rejects_unsorted_labels_for_header_layout(tmp_path):
    with pytest.raises(DcqError, match="sorted by label"):
        write_face_recordio(tmp_path, [(1, b"a"), (0, b"b")])
    assert not (tmp_path / "train.rec").exists() and os.listdir(tmp_path) == []
