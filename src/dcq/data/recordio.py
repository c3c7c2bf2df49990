"""insightface face datasets in RecordIO (``train.rec`` + ``train.idx``), read with numpy only, no mxnet.

The byte format (record framing, ``IRHeader``, writer, reader, ``.idx``) is ``dcq.data.recordio_format``;
its names are re-exported here. This module is what a face dataset makes of the records.

insightface datasets come in two layouts:

- **header layout** (MS1MV2/MS1MV3, what ``face2rec`` writes): record 0 has an empty image and labels
  ``(first identity record, end)``; records ``1 .. first-1`` are the images; record ``first + c`` is
  identity ``c`` with labels ``(first image key, end image key)``.
- **plain layout** (``im2rec``, Glint360K-style dumps): every record is an image whose label is its
  class; there is no header.

Opening a dataset parses the ``.idx`` and reads labels from record headers once, then caches the
result (``dcq.data.index_cache``): per image an int64 offset and an int32 label, plus the identity
grouping the pair sampler needs, memory-mapped back on the next open.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from dcq.data.groups import LabelGroups, narrow_int
from dcq.data.index_cache import IndexCache
from dcq.data.recordio_format import (
    IR_STRUCT,
    LEN_MASK,
    MAGIC,
    IRHeader,
    RecordIOWriter,
    RecordReader,
    class_of,
    pack_record,
    read_index,
    rebuild_index,
    unpack_record,
)
from dcq.data.recordio_writer import write_face_recordio
from dcq.data.source import FaceSource
from dcq.errors import DcqError

__all__ = [
    "MAGIC",
    "FaceRecordIO",
    "IRHeader",
    "RecordIOWriter",
    "RecordReader",
    "pack_record",
    "read_index",
    "rebuild_index",
    "unpack_record",
    "write_face_recordio",
]

log = logging.getLogger(__name__)

CACHE_MIN_IDX_BYTES = 8 << 20  # cache="auto" caches an index of at least ~400k records
_CHUNK = 1 << 20
_REBUILD = "rebuild it with dcq.data.recordio.rebuild_index(rec_path)"


class _KeyLookup:
    """Byte offset of a record key: a dense table for keys 0..M-1, binary search otherwise."""

    def __init__(self, keys: np.ndarray, offsets: np.ndarray):
        top = int(keys.max()) if keys.size else -1
        if top < 4 * keys.size:
            self.table = np.full(top + 1, -1, dtype=np.int64)
            self.table[keys] = offsets
            self.sorted_keys = None
        else:
            order = np.argsort(keys, kind="stable")
            self.sorted_keys = keys[order]
            self.table = offsets[order]

    def __call__(self, keys) -> np.ndarray:
        """Offsets of ``keys``; -1 where a key is not in the index."""
        keys = np.asarray(keys, dtype=np.int64)
        if self.sorted_keys is None:
            inside = (keys >= 0) & (keys < self.table.size)
            return np.where(inside, self.table[np.where(inside, keys, 0)], -1)
        if self.sorted_keys.size == 0:
            return np.full(keys.shape, -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.sorted_keys, keys), self.sorted_keys.size - 1)
        return np.where(self.sorted_keys[pos] == keys, self.table[pos], -1)


class FaceRecordIO(FaceSource):
    """Random-access insightface ``.rec`` dataset (a `FaceSource`): ``len`` images, their labels,
    their encoded bytes.

    ``labels`` (int32 below 2^31 identities) and ``offsets`` (int64) are arrays, memory-mapped
    read-only from the index cache when one is used: ``cache=True`` always, ``False`` never, ``"auto"``
    (default) when the ``.idx`` is at least ``CACHE_MIN_IDX_BYTES`` (8 MiB, ~400k records).
    The ``RecordReader`` (``ds.reader``) opens the file lazily and re-opens it when the process id
    changes, so one instance can be handed to DataLoader workers (fork or spawn); it pickles without
    its file handle.
    """


    def __init__(self, rec_path, idx_path=None, *, relabel: bool = True, cache: bool | str = "auto"):
        self.rec_path = str(rec_path)
        if not os.path.isfile(self.rec_path):
            raise DcqError(f"{self.rec_path}: RecordIO file not found; check the path (e.g. faces_emore/train.rec)")
        self.idx_path = str(idx_path) if idx_path is not None else str(Path(self.rec_path).with_suffix(".idx"))
        if not os.path.isfile(self.idx_path):
            raise DcqError(
                f"{self.idx_path}: index file not found beside {self.rec_path}; pass idx_path= or {_REBUILD}"
            )
        self.reader = RecordReader(self.rec_path)
        self.rec_size = self.reader.size
        default_idx = os.path.abspath(self.idx_path) == os.path.abspath(Path(self.rec_path).with_suffix(".idx"))
        cache_name = None if default_idx else f"{Path(self.rec_path).name}+{Path(self.idx_path).name}"
        params = {"relabel": bool(relabel), "idx": os.path.abspath(self.idx_path)}
        self.index_cache = IndexCache(self.rec_path, [self.rec_path, self.idx_path], params, name=cache_name)
        if cache == "auto":  # small sets parse in well under a second: leave their folder untouched
            cache = os.path.getsize(self.idx_path) >= CACHE_MIN_IDX_BYTES
        loaded = self.index_cache.load() if cache else None
        if loaded is None:
            info, arrays = _IndexBuilder(self, relabel).build()
            if cache and self.index_cache.save(info, arrays) is not None:
                info, arrays = self.index_cache.load() or (info, arrays)  # mapped: RSS only for pages used
        else:
            info, arrays = loaded
        self._apply(info, arrays)

    def _apply(self, info: dict, arrays: dict) -> None:
        self._info, self._arrays = info, arrays
        self.header0 = tuple(info["header0"]) if info["header0"] is not None else None
        self.num_identities = int(info["num_identities"])
        self.offsets = arrays["offsets"]
        self.labels = arrays["labels"]
        self._keys = arrays.get("keys")
        self.label_values = arrays.get("label_values")
        self.identity_ranges = arrays.get("identity_ranges")
        self.groups = LabelGroups(labels=self.labels, starts=arrays["starts"], order=arrays.get("order"),
                                  values=arrays.get("values"), drawable=arrays.get("drawable"))

    def __getstate__(self):
        """Cache-backed arrays travel as file names (a spawned DataLoader worker maps them again)."""
        derived = {"header0", "num_identities", "offsets", "labels", "_keys", "label_values", "identity_ranges",
                   "groups", "_info", "_arrays"}
        state = {k: v for k, v in self.__dict__.items() if k not in derived}
        state["_info"] = self._info
        state["_arrays"] = {name: ("mmap", a.filename) if isinstance(a, np.memmap) and a.filename else a
                            for name, a in self._arrays.items()}
        return state

    def __setstate__(self, state):
        arrays = {name: np.load(a[1], mmap_mode="r", allow_pickle=False) if isinstance(a, tuple) else a
                  for name, a in state.pop("_arrays").items()}
        info = state.pop("_info")
        self.__dict__.update(state)
        self._apply(info, arrays)

    # ------------------------------------------------------------------ derived attributes
    @property
    def image_keys(self) -> np.ndarray:
        """Record key of every image (header layout: 1..N)."""
        if self._keys is None:
            return np.arange(1, len(self) + 1, dtype=np.int64)
        return self._keys

    def _key(self, i: int) -> int:
        return i + 1 if self._keys is None else int(self._keys[i])

    @property
    def raw_labels(self) -> np.ndarray:
        """Labels as stored in the records (before re-indexing to 0..C-1)."""
        if self.label_values is None or self.label_values.size == 0:
            return self.labels
        if self.groups.values is not None:  # relabel=False kept the stored values
            return self.labels
        return self.label_values[self.labels]

    # ------------------------------------------------------------------ public API
    def __len__(self) -> int:
        return int(self.offsets.size)

    def where(self, i: int) -> str:
        """Human-readable location of image ``i`` for error messages."""
        return f"{self.rec_path} image {i} (record key {self._key(i)}) at byte offset {int(self.offsets[i])}"

    def _check_index(self, i: int) -> int:
        i = int(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"image index {i} out of range for {n} images")
        return i

    def record(self, i: int) -> tuple[IRHeader, bytes]:
        """IRHeader and encoded image of image ``i``."""
        i = self._check_index(i)
        payload = self.reader.read(int(self.offsets[i]), f"image {i} (record key {self._key(i)})")
        try:
            return unpack_record(payload)
        except DcqError as exc:
            raise DcqError(f"{self.where(i)}: {exc}") from None

    def image_bytes(self, i: int) -> bytes:
        return self.record(i)[1]

    def indices_of(self, identity: int) -> np.ndarray:
        """Image indices of one identity (ascending)."""
        identity = int(identity)
        if not 0 <= identity < self.num_identities:
            raise IndexError(f"identity {identity} out of range for {self.num_identities} identities")
        values = self.groups.values
        if values is None:
            slot = identity
        else:
            slot = int(np.searchsorted(values, identity))
            if slot >= values.size or values[slot] != identity:
                return np.zeros(0, dtype=np.int64)
        if slot >= self.groups.num_slots:
            return np.zeros(0, dtype=np.int64)
        return self.groups.members(slot)

    def __repr__(self) -> str:
        layout = "header" if getattr(self, "header0", None) is not None else "plain"
        n = self.offsets.size if hasattr(self, "offsets") else "?"
        return (f"FaceRecordIO({getattr(self, 'rec_path', '?')!r}, images={n}, "
                f"identities={getattr(self, 'num_identities', '?')}, layout={layout})")


class _IndexBuilder:
    """Parses the ``.idx`` and the record headers into the arrays ``FaceRecordIO`` caches."""

    def __init__(self, ds: FaceRecordIO, relabel: bool):
        self.ds = ds
        self.relabel = relabel
        self.reader = ds.reader
        self.rec_path = ds.rec_path
        self.idx_path = ds.idx_path

    def build(self) -> tuple[dict, dict]:
        keys, offsets = read_index(self.idx_path, self.ds.rec_size)
        self.lookup = _KeyLookup(keys, offsets)
        header0 = self._detect_header()
        if header0 is not None:
            del keys, offsets
            info, arrays = self._header_layout(header0)
        else:
            info, arrays = self._plain_layout(keys, offsets)
        info["header0"] = list(header0) if header0 is not None else None
        return info, arrays

    def _read_key(self, key: int) -> tuple[IRHeader, bytes]:
        off = int(self.lookup([key])[0])
        if off < 0:
            raise DcqError(f"{self.idx_path}: record key {key} is missing from the index; rebuild it")
        payload = self.reader.read(off, f"record key {key}")
        try:
            return unpack_record(payload)
        except DcqError as exc:
            raise DcqError(f"{self.rec_path}: record key {key} at byte offset {off}: {exc}") from None

    def _detect_header(self) -> tuple[int, int] | None:
        """Record 0 is an insightface header when it has >= 2 labels and no image."""
        if self.lookup([0])[0] < 0:
            return None
        header, img = self._read_key(0)
        if header.flag >= 2 and len(img) == 0:
            first, end = int(header.label[0]), int(header.label[1])
            if 1 <= first <= end:
                return first, end
        return None

    def _offsets_of(self, keys: np.ndarray, what: str) -> np.ndarray:
        offs = self.lookup(keys)
        missing = np.flatnonzero(offs < 0)
        if missing.size:
            raise DcqError(f"{self.idx_path}: {what} key {int(keys[missing[0]])} is not in the index; "
                           f"the .idx is incomplete — {_REBUILD}")
        return offs

    def _header_layout(self, header0: tuple[int, int]) -> tuple[dict, dict]:
        first, end = header0
        n_images = first - 1
        id_keys = np.arange(first, end, dtype=np.int64)
        id_offsets = self._offsets_of(id_keys, f"header record says identity records are keys [{first}, {end}) but")
        offsets = self._offsets_of(np.arange(1, first, dtype=np.int64), "image record")
        del self.lookup
        ranges = np.zeros((end - first, 2), dtype=np.int64)
        for lo in range(0, id_keys.size, _CHUNK):
            heads = self.reader.read_heads(id_offsets[lo:lo + _CHUNK])
            whole = (heads["lrec"] & LEN_MASK) >= IR_STRUCT.size + 8
            usable = (heads["magic"] == MAGIC) & whole & (heads["flag"] >= 2)
            ranges[lo:lo + heads.size] = heads["extra"]
            for j in np.flatnonzero(~usable).tolist():  # split at a magic number, or broken: read it whole
                key = int(id_keys[lo + j])
                h, _ = self._read_key(key)
                if h.flag < 2:
                    raise DcqError(
                        f"{self.rec_path}: identity record key {key} has no (first, end) image range "
                        f"(flag {h.flag}); the header layout is broken — rebuild the .rec"
                    )
                ranges[lo + j] = (int(h.label[0]), int(h.label[1]))
        lengths = ranges[:, 1] - ranges[:, 0]
        ok = bool(np.all((ranges[:, 0] >= 1) & (lengths >= 0) & (ranges[:, 1] <= first)))
        if ok:
            ok = bool(np.all(ranges[1:, 0] == ranges[:-1, 1])) and (n_images == 0 or (
                ranges[0, 0] == 1 and ranges[-1, 1] == first))
        labels = None
        if ok:
            labels = narrow_int(np.repeat(np.arange(end - first, dtype=np.int64), lengths))
        # insightface trains on each image record's own label; check the ranges agree with it.
        if ok and n_images:
            sample = np.unique(np.linspace(0, n_images - 1, num=min(n_images, 64)).astype(np.int64))
            raw = self._read_labels(offsets[sample], sample)
            ok = bool(np.all(raw == labels[sample]))
        arrays = {"offsets": offsets, "identity_ranges": ranges}
        if ok:
            arrays["labels"] = labels
            groups = LabelGroups.from_counts(labels, lengths)
            num_identities = end - first  # identities with no images still count
        else:
            log.warning(
                "%s: identity ranges do not match the image labels (or exceed float32 precision); "
                "reading every image header for its label", self.rec_path
            )
            raw = self._read_labels(offsets, np.arange(n_images))
            groups, _ = self._relabelled(raw, True, offsets)
            arrays["labels"] = groups.labels
            num_identities = groups.num_slots
        arrays.update(groups.arrays())
        return {"layout": "header", "num_identities": int(num_identities)}, arrays

    def _plain_layout(self, keys: np.ndarray, offsets: np.ndarray) -> tuple[dict, dict]:
        del self.lookup
        raw = self._read_labels(offsets, np.arange(offsets.size), keys)
        groups, values = self._relabelled(raw, self.relabel, offsets)
        if groups.values is None:
            num_identities = groups.num_slots
        else:
            num_identities = int(groups.values[-1]) + 1
        arrays = {"offsets": offsets, "labels": groups.labels, "keys": narrow_int(keys), "label_values": values}
        arrays.update(groups.arrays())
        return {"layout": "plain", "num_identities": num_identities}, arrays

    def _relabelled(self, raw: np.ndarray, relabel: bool, offsets: np.ndarray) -> tuple[LabelGroups, np.ndarray]:
        """Groups of the labels, re-indexed to 0..C-1 in sorted order when they are not contiguous."""
        if raw.size and raw.min() < 0:
            i = int(np.flatnonzero(raw < 0)[0])
            raise DcqError(f"{self.rec_path}: image {i} (byte offset {int(offsets[i])}) has negative label {raw[i]}")
        if raw.size == 0:
            empty = np.zeros(0, dtype=np.int32)
            return LabelGroups(labels=empty, starts=np.zeros(1, dtype=np.int32)), empty
        groups = LabelGroups.from_labels(narrow_int(raw))
        if groups.values is None:
            return groups, np.arange(groups.num_slots, dtype=groups.labels.dtype)
        values = groups.values
        if not relabel:
            return groups, values
        counts = np.diff(groups.starts.astype(np.int64))
        dense = np.empty(raw.size, dtype=np.int32 if values.size < 2**31 else np.int64)
        dense[groups.order if groups.order is not None else slice(None)] = np.repeat(
            np.arange(values.size, dtype=dense.dtype), counts)
        log.info("%s: labels are not contiguous; re-indexed %d classes to 0..%d in sorted order",
                 self.rec_path, values.size, values.size - 1)
        return LabelGroups(labels=dense, starts=groups.starts, order=groups.order), values

    def _read_labels(self, offsets: np.ndarray, images: np.ndarray, keys: np.ndarray | None = None) -> np.ndarray:
        """Class label (int64) of image records, from their headers read in chunks."""
        out = np.empty(offsets.size, dtype=np.int64)

        def key_of(j: int) -> int:
            return int(keys[j]) if keys is not None else int(images[j]) + 1

        for lo in range(0, offsets.size, _CHUNK):
            heads = self.reader.read_heads(offsets[lo:lo + _CHUNK])
            bad = np.flatnonzero(heads["magic"] != MAGIC)
            if bad.size:
                j = lo + int(bad[0])
                raise DcqError(
                    f"{self.rec_path}: image {int(images[j])} (record key {key_of(j)}): bad magic "
                    f"0x{int(heads['magic'][bad[0]]):08x} at byte offset {int(offsets[j])}; the .idx does not "
                    f"match this .rec — {_REBUILD}"
                )
            labels = np.where(heads["flag"] > 0, heads["extra"][:, 0], heads["label"]).astype(np.float64)
            # records whose first part is too short to hold the header (split at a magic, or truncated)
            needed = IR_STRUCT.size + np.where(heads["flag"] > 0, 4, 0)
            for j in np.flatnonzero((heads["lrec"] & LEN_MASK) < needed).tolist():
                i = lo + j
                what = f"image {int(images[i])} (record key {key_of(i)})"
                h, _ = unpack_record(self.reader.read(int(offsets[i]), what))
                labels[j] = class_of(h)
            rounded = np.rint(labels).astype(np.int64)
            frac = np.flatnonzero(np.abs(rounded - labels) > 1e-3)
            if frac.size:
                i = lo + int(frac[0])
                raise DcqError(
                    f"{self.rec_path}: image {int(images[i])} at byte offset {int(offsets[i])} has non-integer "
                    f"label {labels[frac[0]]}; this is not a classification .rec"
                )
            out[lo:lo + heads.size] = rounded
        return out
