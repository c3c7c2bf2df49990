"""insightface RecordIO (``train.rec`` + ``train.idx``) read and written with numpy only, no mxnet.

File format (dmlc-core): each record is ``uint32 magic 0xced7230a | uint32 lrec | data | pad to 4``.
The top 3 bits of ``lrec`` are a continuation flag (0 whole, 1 first, 2 middle, 3 last part) and the
low 29 bits the length of this part. A writer splits a payload wherever the magic number appears at a
4-byte-aligned offset of the payload, dropping those 4 bytes; the reader puts them back between parts.
``.idx`` lines are ``key<TAB>byte offset`` of the record's first part.

A payload is mxnet's ``IRHeader`` (``<IfQQ``: flag, label, id, id2) followed, when flag > 0, by
``flag`` float32 labels (then ``label`` is ignored and the first extra label is the class), then the
encoded image.

insightface datasets come in two layouts:

- **header layout** (MS1MV2/MS1MV3, what ``face2rec`` writes): record 0 has an empty image and labels
  ``(first identity record, end)``; records ``1 .. first-1`` are the images; record ``first + c`` is
  identity ``c`` with labels ``(first image key, end image key)``.
- **plain layout** (``im2rec``, Glint360K-style dumps): every record is an image whose label is its
  class; there is no header.
"""

from __future__ import annotations

import logging
import os
import struct
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from dcq.errors import DcqError

__all__ = [
    "MAGIC",
    "FaceRecordIO",
    "IRHeader",
    "RecordIOWriter",
    "pack_record",
    "read_index",
    "rebuild_index",
    "unpack_record",
    "write_face_recordio",
]

log = logging.getLogger(__name__)

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_MASK = (1 << 29) - 1
_IR = struct.Struct("<IfQQ")
_REC_HEAD = struct.Struct("<II")
_FLOAT32_EXACT = 1 << 24  # float32 labels hold integers exactly only up to here


class IRHeader(NamedTuple):
    """mxnet's image-record header. ``label`` is a float, or a float32 array when ``flag`` > 0."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def pack_record(label, image_bytes: bytes, id: int = 0, id2: int = 0, extra_labels=None) -> bytes:
    """Build a payload as ``mx.recordio.pack`` does.

    ``label`` may be a number (flag 0) or a sequence (stored as float32 extra labels, flag = its
    length); ``extra_labels`` is the same as passing a sequence label.
    """
    if extra_labels is None and not np.isscalar(label):
        extra_labels, label = label, 0.0
    if extra_labels is not None:
        extra = np.ascontiguousarray(extra_labels, dtype="<f4").reshape(-1)
        return _IR.pack(int(extra.size), 0.0, int(id), int(id2)) + extra.tobytes() + bytes(image_bytes)
    return _IR.pack(0, float(label), int(id), int(id2)) + bytes(image_bytes)


def unpack_record(payload: bytes) -> tuple[IRHeader, bytes]:
    """Split a payload into its ``IRHeader`` and the encoded image (``mx.recordio.unpack``)."""
    if len(payload) < _IR.size:
        raise DcqError(
            f"record payload of {len(payload)} bytes is shorter than the {_IR.size}-byte IRHeader; "
            "the record is corrupt"
        )
    flag, label, id_, id2 = _IR.unpack_from(payload, 0)
    rest = memoryview(payload)[_IR.size:]
    if flag > 0:
        if len(rest) < 4 * flag:
            raise DcqError(
                f"record payload says {flag} float labels but only {len(rest)} bytes follow the header; "
                "the record is corrupt"
            )
        label = np.frombuffer(rest[: 4 * flag], dtype="<f4").copy()
        rest = rest[4 * flag:]
    return IRHeader(flag, label, id_, id2), bytes(rest)


def _class_of(header: IRHeader) -> float:
    """The class label of an image record: label, or the first extra label when flag > 0."""
    if header.flag > 0:
        return float(header.label[0])
    return float(header.label)


class RecordIOWriter:
    """Sequential ``.rec`` + ``.idx`` writer, byte-compatible with ``mx.recordio.MXIndexedRecordIO``."""

    def __init__(self, rec_path, idx_path=None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        self._rec = open(self.rec_path, "wb")  # noqa: SIM115 - closed by close() / __exit__
        self._idx = open(self.idx_path, "w", encoding="ascii", newline="\n")  # noqa: SIM115
        self._pos = 0
        self.records = 0

    def write(self, key: int, payload: bytes) -> int:
        """Append one record, splitting at aligned magic numbers; returns its byte offset."""
        payload = bytes(payload)
        n = len(payload)
        if n > _LEN_MASK:
            raise DcqError(f"{self.rec_path}: record {key} is {n} bytes; RecordIO records are limited to 2^29-1")
        offset = self._pos
        out = []
        start = 0
        if n >= 4:
            aligned = np.frombuffer(payload, dtype="<u4", count=n // 4)
            splits = np.flatnonzero(aligned == MAGIC) * 4
        else:
            splits = ()
        for s in splits:
            s = int(s)
            out.append(_REC_HEAD.pack(MAGIC, ((1 if start == 0 else 2) << 29) | (s - start)))
            out.append(payload[start:s])  # aligned parts need no padding
            start = s + 4
        last = n - start
        out.append(_REC_HEAD.pack(MAGIC, ((3 if start else 0) << 29) | last))
        out.append(payload[start:])
        out.append(b"\0" * (-last % 4))
        blob = b"".join(out)
        self._rec.write(blob)
        self._pos += len(blob)
        self._idx.write(f"{int(key)}\t{offset}\n")
        self.records += 1
        return offset

    def close(self) -> None:
        if not self._rec.closed:
            self._rec.close()
            self._idx.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_index(idx_path, rec_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Parse ``key<TAB>offset`` lines into two int64 arrays (file order), vectorised.

    Checks what a corrupt or mismatched .idx breaks: two numbers per line, unique keys, offsets
    4-byte aligned and inside the .rec.
    """
    idx_path = str(idx_path)
    with open(idx_path, "rb") as f:
        data = f.read()
    nums = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            nums = np.fromstring(data, dtype=np.int64, sep=" ")  # text mode: the fast parser
        except (ValueError, DeprecationWarning):
            nums = None
    body = data.rstrip()
    lines = body.count(b"\n") + 1 if body else 0
    if nums is None or nums.size != 2 * lines:
        _raise_bad_index_line(idx_path, data)
    pairs = nums.reshape(-1, 2)
    keys, offsets = pairs[:, 0].copy(), pairs[:, 1].copy()
    bad = np.flatnonzero((offsets < 0) | (offsets % 4 != 0) | (keys < 0))
    if rec_size is not None:
        bad = np.union1d(bad, np.flatnonzero(offsets >= rec_size))
    if bad.size:
        i = int(bad[0])
        raise DcqError(
            f"{idx_path}: line {i + 1} has key {keys[i]} at byte offset {offsets[i]}, which cannot start a "
            f"record{'' if rec_size is None else f' of a {rec_size}-byte .rec'}; the .idx does not belong to "
            "this .rec — rebuild it with dcq.data.recordio.rebuild_index(rec_path)"
        )
    sk = np.sort(keys)
    if sk.size > 1 and np.any(sk[1:] == sk[:-1]):  # sort+diff: np.unique is far slower on 5M keys
        dup = int(sk[np.flatnonzero(sk[1:] == sk[:-1])[0]])
        line = int(np.flatnonzero(keys == dup)[1]) + 1
        raise DcqError(f"{idx_path}: key {dup} appears twice (again on line {line}); rebuild the .idx")
    return keys, offsets


def _raise_bad_index_line(idx_path: str, data: bytes) -> None:
    pos = 0
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        parts = line.split()
        ok = len(parts) == 2 and all(p.isdigit() for p in parts)
        if not ok and line.strip():
            raise DcqError(
                f"{idx_path}: line {lineno} (byte {pos}) is {line[:60]!r}, expected 'key<TAB>offset'; "
                "rebuild the .idx with dcq.data.recordio.rebuild_index(rec_path)"
            )
        if not ok and not line.strip() and pos + len(line) < len(data.rstrip()):
            raise DcqError(f"{idx_path}: line {lineno} (byte {pos}) is empty; remove it or rebuild the .idx")
        pos += len(line) + 1
    raise DcqError(f"{idx_path}: cannot parse the index; rebuild it with dcq.data.recordio.rebuild_index(rec_path)")


def rebuild_index(rec_path, idx_path=None) -> int:
    """Write a fresh ``.idx`` by scanning the ``.rec`` (keys = record ordinal, like mxnet's rec2idx)."""
    rec_path = Path(rec_path)
    idx_path = Path(idx_path) if idx_path is not None else rec_path.with_suffix(".idx")
    size = rec_path.stat().st_size
    offsets = []
    with open(rec_path, "rb") as f:
        pos = 0
        start = True
        while pos < size:
            f.seek(pos)
            head = f.read(8)
            if len(head) < 8:
                raise DcqError(f"{rec_path}: truncated record header at byte offset {pos}")
            magic, lrec = _REC_HEAD.unpack(head)
            if magic != MAGIC:
                raise DcqError(f"{rec_path}: bad magic 0x{magic:08x} at byte offset {pos}; not a RecordIO file")
            if start:
                offsets.append(pos)
            cflag, length = lrec >> 29, lrec & _LEN_MASK
            start = cflag in (0, 3)
            pos += 8 + length + (-length % 4)
    fd, tmp = tempfile.mkstemp(dir=str(idx_path.parent), prefix=f".{idx_path.name}.")
    with os.fdopen(fd, "w") as f:
        f.writelines(f"{k}\t{o}\n" for k, o in enumerate(offsets))
    os.replace(tmp, idx_path)
    return len(offsets)


class FaceRecordIO:
    """Random-access insightface ``.rec`` dataset: ``len`` images, their labels, their encoded bytes.

    The file is opened lazily and re-opened when the process id changes, so one instance can be
    handed to DataLoader workers (fork or spawn); it pickles without its file handle.
    """

    identity_names = None

    def __init__(self, rec_path, idx_path=None, *, relabel: bool = True):
        self.rec_path = str(rec_path)
        if not os.path.isfile(self.rec_path):
            raise DcqError(f"{self.rec_path}: RecordIO file not found; check the path (e.g. faces_emore/train.rec)")
        self.idx_path = str(idx_path) if idx_path is not None else str(Path(self.rec_path).with_suffix(".idx"))
        if not os.path.isfile(self.idx_path):
            raise DcqError(
                f"{self.idx_path}: index file not found beside {self.rec_path}; pass idx_path= or rebuild it "
                "with dcq.data.recordio.rebuild_index(rec_path)"
            )
        self._fd: int | None = None
        self._pid: int | None = None
        self.rec_size = os.path.getsize(self.rec_path)
        keys, offsets = read_index(self.idx_path, self.rec_size)
        self._keys_sorted = np.sort(keys)
        self._offsets_by_key = offsets[np.argsort(keys, kind="stable")]
        self.header0: tuple[int, int] | None = self._detect_header()
        if self.header0 is not None:
            self._init_header_layout(keys)
        else:
            self._init_plain_layout(keys, offsets, relabel)
        self.num_identities = max(int(self.labels.max()) + 1 if self.labels.size else 0,
                                  getattr(self, "_declared_identities", 0))
        self._by_label = np.argsort(self.labels, kind="stable")
        self._label_starts = np.searchsorted(self.labels[self._by_label], np.arange(self.num_identities + 1))

    # ------------------------------------------------------------------ file access
    def _file(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._pid != pid:
            self._fd = os.open(self.rec_path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            self._pid = pid
        return self._fd

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fd"] = None
        state["_pid"] = None
        return state

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None and getattr(self, "_pid", None) == os.getpid():
            try:
                os.close(fd)
            except OSError:
                pass

    def _offset_of_key(self, key: int) -> int | None:
        pos = int(np.searchsorted(self._keys_sorted, key))
        if pos < self._keys_sorted.size and self._keys_sorted[pos] == key:
            return int(self._offsets_by_key[pos])
        return None

    def _read_at(self, offset: int, what: str) -> bytes:
        """Read the (possibly multi-part) record whose first part starts at ``offset``."""
        fd = self._file()
        parts = []
        pos = offset
        first = True
        while True:
            head = os.pread(fd, 8, pos)
            if len(head) < 8:
                raise DcqError(
                    f"{self.rec_path}: {what}: truncated record header at byte offset {pos} (file is "
                    f"{self.rec_size} bytes); the .rec was cut short — re-copy or re-create it"
                )
            magic, lrec = _REC_HEAD.unpack(head)
            if magic != MAGIC:
                raise DcqError(
                    f"{self.rec_path}: {what}: bad magic 0x{magic:08x} at byte offset {pos} (expected "
                    f"0x{MAGIC:08x}); the .idx does not match this .rec — rebuild it with "
                    "dcq.data.recordio.rebuild_index(rec_path)"
                )
            cflag, length = lrec >> 29, lrec & _LEN_MASK
            if (first and cflag not in (0, 1)) or (not first and cflag not in (2, 3)):
                raise DcqError(
                    f"{self.rec_path}: {what}: unexpected continuation flag {cflag} at byte offset {pos}; "
                    "the .idx points into the middle of a record — rebuild it"
                )
            data = os.pread(fd, length, pos + 8) if length else b""
            if len(data) < length:
                raise DcqError(
                    f"{self.rec_path}: {what}: truncated record at byte offset {pos}: header says {length} "
                    f"bytes, only {len(data)} left in the file; re-copy or re-create the .rec"
                )
            parts.append(data)
            if cflag in (0, 3):
                break
            parts.append(_MAGIC_BYTES)
            pos += 8 + length + (-length % 4)
            first = False
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_key(self, key: int) -> tuple[IRHeader, bytes]:
        off = self._offset_of_key(key)
        if off is None:
            raise DcqError(f"{self.idx_path}: record key {key} is missing from the index; rebuild it")
        payload = self._read_at(off, f"record key {key}")
        try:
            return unpack_record(payload)
        except DcqError as exc:
            raise DcqError(f"{self.rec_path}: record key {key} at byte offset {off}: {exc}") from None

    # ------------------------------------------------------------------ layouts
    def _detect_header(self) -> tuple[int, int] | None:
        """Record 0 is an insightface header when it has >= 2 labels and no image."""
        if self._offset_of_key(0) is None:
            return None
        header, img = self._read_key(0)
        if header.flag >= 2 and len(img) == 0:
            first, end = int(header.label[0]), int(header.label[1])
            if 1 <= first <= end:
                return first, end
        return None

    def _init_header_layout(self, keys: np.ndarray) -> None:
        first, end = self.header0
        n_images = first - 1
        missing = np.setdiff1d(np.arange(first, end), self._keys_sorted)
        if missing.size:
            raise DcqError(
                f"{self.idx_path}: header record says identity records are keys [{first}, {end}) but key "
                f"{int(missing[0])} is not in the index; the .idx is incomplete — rebuild it"
            )
        self.image_keys = np.arange(1, first, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._keys_sorted, self.image_keys), self._keys_sorted.size - 1)
        absent = np.flatnonzero(self._keys_sorted[pos] != self.image_keys)
        if absent.size:
            raise DcqError(
                f"{self.idx_path}: image record key {int(self.image_keys[absent[0]])} is missing from the "
                "index; rebuild it with dcq.data.recordio.rebuild_index(rec_path)"
            )
        self.offsets = self._offsets_by_key[pos]
        ranges = np.zeros((end - first, 2), dtype=np.int64)
        for c, key in enumerate(range(first, end)):
            h, _ = self._read_key(key)
            if h.flag < 2:
                raise DcqError(
                    f"{self.rec_path}: identity record key {key} has no (first, end) image range "
                    f"(flag {h.flag}); the header layout is broken — rebuild the .rec"
                )
            ranges[c] = (int(h.label[0]), int(h.label[1]))
        labels = np.full(n_images, -1, dtype=np.int64)
        ok = bool(np.all((ranges[:, 0] >= 1) & (ranges[:, 0] <= ranges[:, 1]) & (ranges[:, 1] <= first)))
        if ok:
            lengths = ranges[:, 1] - ranges[:, 0]
            ok = bool(np.all(ranges[1:, 0] == ranges[:-1, 1])) and (n_images == 0 or (
                ranges[0, 0] == 1 and ranges[-1, 1] == first))
            if ok:
                labels = np.repeat(np.arange(end - first, dtype=np.int64), lengths)
        # insightface trains on each image record's own label; check the ranges agree with it.
        if ok and n_images:
            sample = np.unique(np.linspace(0, n_images - 1, num=min(n_images, 64)).astype(np.int64))
            raw = np.array([_class_of(self.record(int(i))[0]) for i in sample])
            ok = bool(np.all(raw == labels[sample]))
        if not ok:
            log.warning(
                "%s: identity ranges do not match the image labels (or exceed float32 precision); "
                "reading every image header for its label", self.rec_path
            )
            raw = self._read_labels(self.offsets)
            self.labels = self._relabel(raw, True)
            self.raw_labels = raw
        else:
            self.labels = self.raw_labels = labels
            self._declared_identities = end - first  # identities with no images still count
        self.identity_ranges = ranges

    def _init_plain_layout(self, keys: np.ndarray, offsets: np.ndarray, relabel: bool) -> None:
        self.image_keys = keys
        self.offsets = offsets
        self.identity_ranges = None
        raw = self._read_labels(offsets)
        self.raw_labels = raw
        self.labels = self._relabel(raw, relabel)

    def _relabel(self, raw: np.ndarray, relabel: bool) -> np.ndarray:
        """Map labels to 0..C-1 in sorted order when they are not already contiguous."""
        if raw.size and raw.min() < 0:
            i = int(np.flatnonzero(raw < 0)[0])
            raise DcqError(
                f"{self.rec_path}: image {i} (byte offset {int(self.offsets[i])}) has negative label {raw[i]}"
            )
        if raw.size == 0:
            self.label_values = raw
            return raw
        order = np.argsort(raw, kind="stable")
        srt = raw[order]
        is_new = np.empty(srt.size, dtype=bool)
        is_new[0] = True
        np.not_equal(srt[1:], srt[:-1], out=is_new[1:])
        values = srt[is_new]
        self.label_values = values
        if not relabel or (values[0] == 0 and values[-1] == values.size - 1):
            return raw
        inverse = np.empty(raw.size, dtype=np.int64)
        inverse[order] = np.cumsum(is_new) - 1
        log.info("%s: labels are not contiguous; re-indexed %d classes to 0..%d in sorted order",
                 self.rec_path, values.size, values.size - 1)
        return inverse

    def _read_labels(self, offsets: np.ndarray) -> np.ndarray:
        """Class label of every image record: one 36-byte read per record, parsed with numpy."""
        fd = self._file()
        need = 8 + _IR.size + 4
        parts = []
        for lo in range(0, len(offsets), 1 << 18):  # bounded memory for millions of records
            chunk = offsets[lo:lo + (1 << 18)].tolist()
            blob = b"".join([os.pread(fd, need, o) for o in chunk])
            if len(blob) != need * len(chunk):  # a record near the end of the file is shorter
                blob = b"".join([os.pread(fd, need, o).ljust(need, b"\0") for o in chunk])
            parts.append(blob)
        blob = b"".join(parts)
        rec = np.frombuffer(blob, dtype=np.dtype([("magic", "<u4"), ("lrec", "<u4"), ("flag", "<u4"),
                                                   ("label", "<f4"), ("id", "<u8"), ("id2", "<u8"),
                                                   ("extra", "<f4")]))
        if rec.size and np.any(rec["magic"] != MAGIC):
            i = int(np.flatnonzero(rec["magic"] != MAGIC)[0])
            raise DcqError(
                f"{self.rec_path}: image {i} (key {int(self.image_keys[i])}): bad magic "
                f"0x{int(rec['magic'][i]):08x} at byte offset {int(offsets[i])}; the .idx does not match "
                "this .rec — rebuild it with dcq.data.recordio.rebuild_index(rec_path)"
            )
        labels = np.where(rec["flag"] > 0, rec["extra"], rec["label"]).astype(np.float64)
        # Records whose first part is too short to hold the header (split at a magic, or truncated):
        length = rec["lrec"] & _LEN_MASK
        needed = _IR.size + np.where(rec["flag"] > 0, 4, 0)
        slow = np.flatnonzero(length < needed)
        for i in slow:
            h, _ = unpack_record(self._read_at(int(offsets[i]), f"image {int(i)} (key {int(self.image_keys[i])})"))
            labels[i] = _class_of(h)
        out = np.rint(labels).astype(np.int64)
        frac = np.flatnonzero(np.abs(out - labels) > 1e-3)
        if frac.size:
            i = int(frac[0])
            raise DcqError(
                f"{self.rec_path}: image {i} at byte offset {int(offsets[i])} has non-integer label "
                f"{labels[i]}; this is not a classification .rec"
            )
        return out

    # ------------------------------------------------------------------ public API
    def __len__(self) -> int:
        return int(self.offsets.size)

    def where(self, i: int) -> str:
        """Human-readable location of image ``i`` for error messages."""
        return f"{self.rec_path} image {i} (record key {int(self.image_keys[i])}) at byte offset {int(self.offsets[i])}"

    def _check_index(self, i: int) -> int:
        i = int(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"image index {i} out of range for {n} images")
        return i

    def label(self, i: int) -> int:
        return int(self.labels[self._check_index(i)])

    def record(self, i: int) -> tuple[IRHeader, bytes]:
        """IRHeader and encoded image of image ``i``."""
        i = self._check_index(i)
        payload = self._read_at(int(self.offsets[i]), f"image {i} (record key {int(self.image_keys[i])})")
        try:
            return unpack_record(payload)
        except DcqError as exc:
            raise DcqError(f"{self.where(i)}: {exc}") from None

    def image_bytes(self, i: int) -> bytes:
        return self.record(i)[1]

    def image(self, i: int, image_size: int | None = None) -> np.ndarray:
        """Decoded uint8 HxWx3 RGB; a corrupt image raises DcqError naming file, record and offset."""
        from dcq.data.transforms import decode_image

        return decode_image(self.image_bytes(i), image_size, where=self.where(self._check_index(i)))

    def __getitem__(self, i: int) -> tuple[bytes, int]:
        return self.image_bytes(i), self.label(i)

    def indices_of(self, identity: int) -> np.ndarray:
        """Image indices of one identity (ascending)."""
        identity = int(identity)
        if not 0 <= identity < self.num_identities:
            raise IndexError(f"identity {identity} out of range for {self.num_identities} identities")
        return np.sort(self._by_label[self._label_starts[identity]:self._label_starts[identity + 1]])

    def __repr__(self) -> str:
        layout = "header" if getattr(self, "header0", None) is not None else "plain"
        n = self.offsets.size if hasattr(self, "offsets") else "?"
        return (f"FaceRecordIO({getattr(self, 'rec_path', '?')!r}, images={n}, "
                f"identities={getattr(self, 'num_identities', '?')}, layout={layout})")


def write_face_recordio(out_dir, items: Iterable[tuple[int, bytes]], name: str = "train", *,
                        header: bool = True, num_identities: int | None = None) -> dict:
    """Write ``OUT/<name>.rec`` + ``.idx`` from ``(label, image_bytes)`` items, atomically.

    ``header=True`` writes insightface's header layout (what MS1MV2 ships as): items must come sorted
    by label (streamed, not held in memory); identity ``c`` gets a record with its image range even
    when it has no images (``num_identities`` sets how many). ``header=False`` writes the plain
    layout in item order (keys 0..N-1). Both files are written to temporary names and renamed at the
    end, so an interrupted run leaves no .rec that looks complete.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rec_path, idx_path = out_dir / f"{name}.rec", out_dir / f"{name}.idx"
    tmp_rec = out_dir / f".{name}.rec.tmp{os.getpid()}"
    tmp_idx = out_dir / f".{name}.idx.tmp{os.getpid()}"
    counts: list[int] = []
    n = 0
    try:
        with RecordIOWriter(tmp_rec, tmp_idx) as w:
            prev = -1
            for label, img in items:
                label = int(label)
                if label < 0:
                    raise DcqError(f"write_face_recordio: item {n} has negative label {label}")
                if header:
                    if label < prev:
                        raise DcqError(
                            f"write_face_recordio: item {n} has label {label} after label {prev}; the header "
                            "layout needs items sorted by label (sort them, or pass header=False)"
                        )
                    if n + 1 >= _FLOAT32_EXACT:
                        raise DcqError(
                            "write_face_recordio: more than 2^24 images cannot be indexed exactly by float32 "
                            "header labels; write the plain layout (header=False)"
                        )
                    prev = label
                    w.write(n + 1, pack_record(float(label), img))
                else:
                    w.write(n, pack_record(float(label), img))
                while len(counts) <= label:
                    counts.append(0)
                counts[label] += 1
                n += 1
            if header:
                c_total = max(len(counts), int(num_identities or 0))
                counts += [0] * (c_total - len(counts))
                first = n + 1
                start = 1
                for c, k in enumerate(counts):
                    w.write(first + c, pack_record(0.0, b"", extra_labels=(start, start + k)))
                    start += k
                w.write(0, pack_record(0.0, b"", extra_labels=(first, first + len(counts))))
        os.replace(tmp_idx, idx_path)
        os.replace(tmp_rec, rec_path)
    finally:
        for p in (tmp_rec, tmp_idx):
            if p.exists():
                p.unlink()
    return {"rec": str(rec_path), "idx": str(idx_path), "images": n, "identities": len(counts),
            "images_per_identity": counts}
