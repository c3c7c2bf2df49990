"""The gallery file: one JSON header and raw arrays in a single file, written atomically.

One file (not a folder) so that `atomic_write` can replace it in one rename: a search never sees
half a gallery, and a crash while adding leaves the previous one. Arrays start at 64-byte
offsets and are memory-mapped on reading, so an exact search over millions of rows does not load
them all at once. A sha256 of everything after it is checked on every read (streamed), so a
flipped bit is reported instead of searched: a damaged vector would otherwise score anything.

Layout: ``DCQGAL02``, the header length (8 bytes, little endian), the sha256 digest (32 bytes) of
the rest of the file, the UTF-8 JSON header (with ``"arrays": {name: {"dtype", "shape",
"offset"}}``, offsets from the start of the file), the arrays. ``DCQGAL01`` files (no digest) are
still read.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np

from dcq.atomic import atomic_write
from dcq.errors import DcqError

MAGIC = b"DCQGAL02"
MAGIC_V1 = b"DCQGAL01"  # before the digest
DIGEST = 32
ALIGN = 64
DTYPES = ("<f4", "|u1")  # what galleries hold: float32 vectors, bytes (labels, a faiss index)
_BLOCK = 1 << 22


def _layout(header: dict, arrays: dict[str, np.ndarray]) -> tuple[bytes, list[tuple[int, np.ndarray]]]:
    """The encoded header and (offset, array) pairs; offsets depend on the header's own length."""
    specs = {name: {"dtype": a.dtype.str, "shape": list(a.shape), "offset": 0} for name, a in arrays.items()}
    for _ in range(3):  # the offsets' digits change the header length at most a couple of times
        encoded = json.dumps({**header, "arrays": specs}).encode()
        pos = len(MAGIC) + 8 + DIGEST + len(encoded)
        placed = []
        for name, a in arrays.items():
            pos = -(-pos // ALIGN) * ALIGN
            placed.append((pos, a))
            specs[name]["offset"] = pos
            pos += a.nbytes
        again = json.dumps({**header, "arrays": specs}).encode()
        if len(again) == len(encoded):
            return again, placed
    raise AssertionError("gallery header layout did not settle")


def write_store(path, header: dict, arrays: dict[str, np.ndarray]) -> Path:
    """Write ``header`` (JSON-able) and ``arrays`` to ``path`` atomically, with their digest."""
    arrays = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
    encoded, placed = _layout(header, arrays)

    def write(f):
        h = hashlib.sha256()

        def put(data: bytes) -> None:
            h.update(data)
            f.write(data)

        f.write(MAGIC + struct.pack("<Q", len(encoded)) + b"\0" * DIGEST)
        put(encoded)
        for offset, a in placed:
            put(b"\0" * (offset - f.tell()))
            for start in range(0, max(len(a), 1), 1 << 16):  # in slices: a memory-mapped source stays lazy
                put(a[start:start + (1 << 16)].tobytes())
        f.seek(len(MAGIC) + 8)
        f.write(h.digest())
        f.seek(0, 2)

    return atomic_write(path, write)


def damaged(path, what: str) -> DcqError:
    """The one-line error for a gallery file whose bytes or header are not what was written."""
    return DcqError(f"{path}: the gallery file is damaged ({what}); build it again or restore a copy")


def _digest_matches(path: Path, start: int, digest: bytes) -> bool:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while block := f.read(_BLOCK):
            h.update(block)
    return h.digest() == digest


def _spec(path: Path, name, spec, start: int, size: int) -> tuple[np.dtype, tuple[int, ...], int]:
    """An array's dtype, shape and offset from the header, each checked against the file."""
    try:
        dtype, shape, offset = spec["dtype"], spec["shape"], spec["offset"]
        ok = (dtype in DTYPES and isinstance(shape, list) and len(shape) <= 2
              and all(type(n) is int and 0 <= n < 2**48 for n in shape) and type(offset) is int)
    except (TypeError, KeyError):
        ok = False
    if not ok or offset < start:
        raise damaged(path, f"array {str(name)[:40]!r} has no valid dtype, shape and offset")
    dtype, shape = np.dtype(dtype), tuple(shape)
    if offset + dtype.itemsize * int(np.prod(shape)) > size:
        raise DcqError(f"{path}: truncated gallery file ({name} runs past its end); build it again")
    return dtype, shape, offset


def read_store(path) -> tuple[dict, dict[str, np.ndarray]]:
    """(header, name -> read-only memory-mapped array) of a gallery file, its digest checked."""
    path = Path(path)
    if path.is_dir() or not path.exists():
        raise DcqError(f"{path}: no gallery file; make one with `dcq gallery build EMB --out {path}`")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + 8)
        if len(head) < len(MAGIC) + 8 or head[:len(MAGIC)] not in (MAGIC, MAGIC_V1):
            raise DcqError(f"{path}: not a dcq gallery file (made by `dcq gallery build`)")
        digest = f.read(DIGEST) if head[:len(MAGIC)] == MAGIC else None
        (length,) = struct.unpack("<Q", head[len(MAGIC):])
        start = f.tell()
        if length > size - start:
            raise DcqError(f"{path}: truncated gallery file (its header runs past its end); build it again")
        try:
            header = json.loads(f.read(length).decode())
        except (UnicodeDecodeError, ValueError, RecursionError):
            header = None
    if not isinstance(header, dict) or not isinstance(header.get("arrays", {}), dict):
        raise DcqError(f"{path}: the gallery header is damaged; build the gallery again")
    specs = {name: _spec(path, name, spec, start + length, size) for name, spec in header.pop("arrays", {}).items()}
    if digest is not None and not _digest_matches(path, start, digest):
        raise damaged(path, "its checksum does not match its bytes: a disk or copy error changed it")
    arrays = {}
    for name, (dtype, shape, offset) in specs.items():
        if int(np.prod(shape)) == 0:
            arrays[name] = np.empty(shape, dtype=dtype)
        else:
            arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    return header, arrays
