"""The gallery file: one JSON header and raw arrays in a single file, written atomically.

One file (not a folder) so that `atomic_write` can replace it in one rename: a search never sees
half a gallery, and a crash while adding leaves the previous one. Arrays start at 64-byte
offsets and are memory-mapped on reading, so an exact search over millions of rows does not load
them all at once.

Layout: ``DCQGAL01``, the header length (8 bytes, little endian), the UTF-8 JSON header (with
``"arrays": {name: {"dtype", "shape", "offset"}}``, offsets from the start of the file), the arrays.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from dcq.atomic import atomic_write
from dcq.errors import DcqError

MAGIC = b"DCQGAL01"
ALIGN = 64


def _layout(header: dict, arrays: dict[str, np.ndarray]) -> tuple[bytes, list[tuple[int, np.ndarray]]]:
    """The encoded header and (offset, array) pairs; offsets depend on the header's own length."""
    specs = {name: {"dtype": a.dtype.str, "shape": list(a.shape), "offset": 0} for name, a in arrays.items()}
    for _ in range(3):  # the offsets' digits change the header length at most a couple of times
        encoded = json.dumps({**header, "arrays": specs}).encode()
        pos = len(MAGIC) + 8 + len(encoded)
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
    """Write ``header`` (JSON-able) and ``arrays`` to ``path`` atomically."""
    arrays = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
    encoded, placed = _layout(header, arrays)

    def write(f):
        f.write(MAGIC + struct.pack("<Q", len(encoded)) + encoded)
        for offset, a in placed:
            f.write(b"\0" * (offset - f.tell()))
            for start in range(0, max(len(a), 1), 1 << 16):  # in slices: a memory-mapped source stays lazy
                f.write(a[start:start + (1 << 16)].tobytes())

    return atomic_write(path, write)


def read_store(path) -> tuple[dict, dict[str, np.ndarray]]:
    """(header, name -> read-only memory-mapped array) of a gallery file."""
    path = Path(path)
    if path.is_dir() or not path.exists():
        raise DcqError(f"{path}: no gallery file; make one with `dcq gallery build EMB --out {path}`")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + 8)
        if len(head) < len(MAGIC) + 8 or head[:len(MAGIC)] != MAGIC:
            raise DcqError(f"{path}: not a dcq gallery file (made by `dcq gallery build`)")
        (length,) = struct.unpack("<Q", head[len(MAGIC):])
        try:
            header = json.loads(f.read(length).decode())
        except (UnicodeDecodeError, ValueError):
            raise DcqError(f"{path}: the gallery header is damaged; build the gallery again") from None
    arrays = {}
    for name, spec in header.pop("arrays", {}).items():
        dtype, shape, offset = np.dtype(spec["dtype"]), tuple(spec["shape"]), int(spec["offset"])
        if offset + dtype.itemsize * int(np.prod(shape)) > size:
            raise DcqError(f"{path}: truncated gallery file ({name} runs past its end); build it again")
        if int(np.prod(shape)) == 0:
            arrays[name] = np.empty(shape, dtype=dtype)
        else:
            arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    return header, arrays
