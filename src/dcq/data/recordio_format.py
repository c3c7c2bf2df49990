"""The RecordIO byte format (dmlc-core / mxnet): record framing, ``IRHeader``, writer, reader, ``.idx``.

Each record is ``uint32 magic 0xced7230a | uint32 lrec | data | pad to 4``. The top 3 bits of
``lrec`` are a continuation flag (0 whole, 1 first, 2 middle, 3 last part) and the low 29 bits the
length of this part. A writer splits a payload wherever the magic number appears at a 4-byte-aligned
offset of the payload, dropping those 4 bytes; the reader puts them back between parts.
``.idx`` lines are ``key<TAB>byte offset`` of the record's first part.

A payload is mxnet's ``IRHeader`` (``<IfQQ``: flag, label, id, id2) followed, when flag > 0, by
``flag`` float32 labels (then ``label`` is ignored and the first extra label is the class), then the
encoded image.

What a face dataset makes of the records (layouts, labels, identities) is ``dcq.data.recordio``.
"""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

from dcq.atomic import atomic_write
from dcq.errors import DcqError

__all__ = [
    "HEAD_DTYPE",
    "IR_STRUCT",
    "LEN_MASK",
    "MAGIC",
    "IRHeader",
    "RecordIOWriter",
    "RecordReader",
    "class_of",
    "pack_record",
    "read_index",
    "rebuild_index",
    "unpack_record",
]

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
LEN_MASK = (1 << 29) - 1
IR_STRUCT = struct.Struct("<IfQQ")
_REC_HEAD = struct.Struct("<II")
# the first 40 bytes of a record: framing, IRHeader and the first two extra float labels
HEAD_DTYPE = np.dtype([("magic", "<u4"), ("lrec", "<u4"), ("flag", "<u4"), ("label", "<f4"), ("id", "<u8"),
                       ("id2", "<u8"), ("extra", "<f4", (2,))])
_REBUILD = "rebuild it with dcq.data.recordio.rebuild_index(rec_path)"


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
        return IR_STRUCT.pack(int(extra.size), 0.0, int(id), int(id2)) + extra.tobytes() + bytes(image_bytes)
    return IR_STRUCT.pack(0, float(label), int(id), int(id2)) + bytes(image_bytes)


def unpack_record(payload: bytes) -> tuple[IRHeader, bytes]:
    """Split a payload into its ``IRHeader`` and the encoded image (``mx.recordio.unpack``)."""
    if len(payload) < IR_STRUCT.size:
        raise DcqError(
            f"record payload of {len(payload)} bytes is shorter than the {IR_STRUCT.size}-byte IRHeader; "
            "the record is corrupt"
        )
    flag, label, id_, id2 = IR_STRUCT.unpack_from(payload, 0)
    rest = memoryview(payload)[IR_STRUCT.size:]
    if flag > 0:
        if len(rest) < 4 * flag:
            raise DcqError(
                f"record payload says {flag} float labels but only {len(rest)} bytes follow the header; "
                "the record is corrupt"
            )
        label = np.frombuffer(rest[: 4 * flag], dtype="<f4").copy()
        rest = rest[4 * flag:]
    return IRHeader(flag, label, id_, id2), bytes(rest)


def class_of(header: IRHeader) -> float:
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
        if n > LEN_MASK:
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


def read_index(idx_path, rec_size: int | None = None, *, block: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """Parse ``key<TAB>offset`` lines into two int64 arrays (file order).

    Vectorised and streamed: the file is read in ``block``-byte pieces cut at line ends, each parsed
    by numpy's C text parser into arrays allocated once (a first pass counts the lines), so memory is
    the two arrays plus one block — a 200M-line index needs 3.2 GB and no Python per line.
    Checks what a corrupt or mismatched .idx breaks: two numbers per line, unique keys, offsets
    4-byte aligned and inside the .rec.
    """
    idx_path = str(idx_path)
    cap = _count_lines(idx_path, block)
    keys = np.empty(cap, dtype=np.int64)
    offsets = np.empty(cap, dtype=np.int64)
    n = 0
    line_base = byte_base = 0
    pending_blank = None  # (line, byte) of a blank line, an error unless only blank lines follow
    carry = b""
    with open(idx_path, "rb") as f:
        while True:
            chunk = f.read(block)
            data = carry + chunk
            cut = data.rfind(b"\n") + 1 if chunk else len(data)
            body, carry = data[:cut], data[cut:]
            stripped = body.rstrip()
            lines = stripped.count(b"\n") + 1 if stripped else 0
            if lines:
                if pending_blank is not None:
                    raise DcqError(f"{idx_path}: line {pending_blank[0]} (byte {pending_blank[1]}) is empty; "
                                   "remove it or rebuild the .idx")
                nums = _parse_numbers(stripped)
                if nums is None or nums.size != 2 * lines:
                    _raise_bad_index_line(idx_path, body, line_base, byte_base)
                keys[n:n + lines] = nums[0::2]
                offsets[n:n + lines] = nums[1::2]
                _check_offsets(idx_path, keys[n:n + lines], offsets[n:n + lines], n, rec_size)
                n += lines
            if pending_blank is None and body[len(stripped):].count(b"\n") > (1 if stripped else 0):
                pending_blank = (line_base + lines + 1, byte_base + len(stripped) + (1 if stripped else 0))
            line_base += body.count(b"\n")
            byte_base += len(body)
            if not chunk:
                break
    keys, offsets = keys[:n], offsets[:n]
    _check_unique_keys(idx_path, keys)
    return keys, offsets


def _check_offsets(idx_path: str, keys: np.ndarray, offsets: np.ndarray, first_line: int, rec_size) -> None:
    """Offsets must be 4-byte aligned and inside the .rec, keys non-negative (one block at a time)."""
    bad = (offsets < 0) | (offsets & 3 != 0) | (keys < 0)
    if rec_size is not None:
        bad |= offsets >= rec_size
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise DcqError(
            f"{idx_path}: line {first_line + j + 1} has key {keys[j]} at byte offset {offsets[j]}, which cannot "
            f"start a record{'' if rec_size is None else f' of a {rec_size}-byte .rec'}; the .idx does not "
            f"belong to this .rec — {_REBUILD}"
        )


def _count_lines(path: str, block: int) -> int:
    lines, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(block):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")


def _parse_numbers(text: bytes) -> np.ndarray | None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            return np.fromstring(text, dtype=np.int64, sep=" ")  # text mode: numpy's C parser
        except (ValueError, DeprecationWarning):
            return None


def _check_unique_keys(idx_path: str, keys: np.ndarray) -> None:
    n = keys.size
    if n < 2:
        return
    top = int(keys.max())
    if top < 4 * n:  # dense keys (the usual 0..n-1): one byte per possible key instead of a sort
        mark = np.zeros(top + 1, dtype=np.uint8)
        mark[keys] = 1
        if int(mark.sum(dtype=np.int64)) == n:
            return
        del mark
    sk = np.sort(keys)
    if np.any(sk[1:] == sk[:-1]):
        dup = int(sk[np.flatnonzero(sk[1:] == sk[:-1])[0]])
        line = int(np.flatnonzero(keys == dup)[1]) + 1
        raise DcqError(f"{idx_path}: key {dup} appears twice (again on line {line}); rebuild the .idx")


def _raise_bad_index_line(idx_path: str, data: bytes, line_base: int = 0, byte_base: int = 0) -> None:
    pos = byte_base
    end = byte_base + len(data.rstrip())
    for lineno, line in enumerate(data.split(b"\n"), start=line_base + 1):
        parts = line.split()
        ok = len(parts) == 2 and all(p.isdigit() for p in parts)
        if not ok and line.strip():
            raise DcqError(
                f"{idx_path}: line {lineno} (byte {pos}) is {line[:60]!r}, expected 'key<TAB>offset'; "
                f"{_REBUILD.replace('it', 'the .idx', 1)}"
            )
        if not ok and not line.strip() and pos + len(line) < end:
            raise DcqError(f"{idx_path}: line {lineno} (byte {pos}) is empty; remove it or rebuild the .idx")
        pos += len(line) + 1
    raise DcqError(f"{idx_path}: cannot parse the index; {_REBUILD}")


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
            cflag, length = lrec >> 29, lrec & LEN_MASK
            start = cflag in (0, 3)
            pos += 8 + length + (-length % 4)
    atomic_write(idx_path, lambda f: f.writelines(f"{k}\t{o}\n".encode() for k, o in enumerate(offsets)))
    return len(offsets)


class RecordReader:
    """Reads the records of one ``.rec`` by byte offset, putting split payloads back together.

    The file is opened lazily and re-opened when the process id changes, so one reader can be handed
    to DataLoader workers (fork or spawn); it pickles without its file handle.
    """

    def __init__(self, rec_path):
        self.path = str(rec_path)
        self.size = os.path.getsize(self.path)
        self._fd: int | None = None
        self._pid: int | None = None

    def _file(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._pid != pid:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
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

    def read(self, offset: int, what: str = "record") -> bytes:
        """The payload of the (possibly multi-part) record whose first part starts at ``offset``."""
        fd = self._file()
        parts = []
        pos = int(offset)
        first = True
        while True:
            head = os.pread(fd, 8, pos)
            if len(head) < 8:
                raise DcqError(
                    f"{self.path}: {what}: truncated record header at byte offset {pos} (file is "
                    f"{self.size} bytes); the .rec was cut short — re-copy or re-create it"
                )
            magic, lrec = _REC_HEAD.unpack(head)
            if magic != MAGIC:
                raise DcqError(
                    f"{self.path}: {what}: bad magic 0x{magic:08x} at byte offset {pos} (expected "
                    f"0x{MAGIC:08x}); the .idx does not match this .rec — {_REBUILD}"
                )
            cflag, length = lrec >> 29, lrec & LEN_MASK
            if (first and cflag not in (0, 1)) or (not first and cflag not in (2, 3)):
                raise DcqError(
                    f"{self.path}: {what}: unexpected continuation flag {cflag} at byte offset {pos}; "
                    "the .idx points into the middle of a record — rebuild it"
                )
            data = os.pread(fd, length, pos + 8) if length else b""
            if len(data) < length:
                raise DcqError(
                    f"{self.path}: {what}: truncated record at byte offset {pos}: header says {length} "
                    f"bytes, only {len(data)} left in the file; re-copy or re-create the .rec"
                )
            parts.append(data)
            if cflag in (0, 3):
                break
            parts.append(_MAGIC_BYTES)
            pos += 8 + length + (-length % 4)
            first = False
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_heads(self, offsets, *, gap: int = 1 << 16, span: int = 1 << 26) -> np.ndarray:
        """The first 40 bytes (``HEAD_DTYPE``) of the records at ``offsets``, zero-padded at the file end.

        Records closer than ``gap`` bytes are read together with one ``pread`` of up to ``span`` bytes
        and cut apart with numpy (a .rec of small records streams at disk speed); isolated records
        cost one ``pread`` each. Fields are not validated here.
        """
        offsets = np.asarray(offsets, dtype=np.int64)
        n = offsets.size
        need = HEAD_DTYPE.itemsize
        out = np.zeros(n, dtype=HEAD_DTYPE)
        raw = out.view(np.uint8).reshape(n, need)
        fd = self._file()
        ascending = n < 2 or bool(np.all(offsets[1:] >= offsets[:-1]))
        order = None if ascending else np.argsort(offsets, kind="stable")
        for lo in range(0, n, 1 << 20):
            seg = offsets[lo:lo + (1 << 20)] if order is None else offsets[order[lo:lo + (1 << 20)]]
            dest = np.arange(lo, lo + seg.size) if order is None else order[lo:lo + seg.size]
            cut = np.flatnonzero(np.diff(seg) > gap) + 1
            bounds = np.concatenate([[0], cut, [seg.size]])
            singles = []
            for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
                while a < b:
                    if b - a == 1:
                        singles.append(a)
                        break
                    start = int(seg[a])
                    stop = a + int(np.searchsorted(seg[a:b], start + span - need, side="right"))
                    stop = max(stop, a + 1)
                    end = int(seg[stop - 1]) + need
                    buf = np.frombuffer(os.pread(fd, end - start, start).ljust(end - start, b"\0"), np.uint8)
                    windows = np.lib.stride_tricks.sliding_window_view(buf, need)  # a view, no copy
                    raw[dest[a:stop]] = windows[seg[a:stop] - start]
                    a = stop
            if singles:
                blob = b"".join(os.pread(fd, need, o).ljust(need, b"\0") for o in seg[singles].tolist())
                raw[dest[singles]] = np.frombuffer(blob, np.uint8).reshape(-1, need)
        return out
