"""Images grouped by identity, in as few bytes as the sizes allow.

``LabelGroups`` answers what the pair sampler and ``indices_of`` ask: which identity an image
belongs to, and which images an identity has. For N images of V label values it holds

- ``labels`` (N,): the caller's array, not copied (a memory-mapped cache file works as is);
- ``starts`` (V+1,): slot ``v``'s images are ``order[starts[v]:starts[v+1]]`` (int32 below 2^31
  images, else int64);
- ``order`` (N,): images sorted by label (stable), or ``None`` when the labels are already sorted,
  as in insightface's header layout, where it would be ``arange(N)``;
- ``values`` (V,): the label value of slot ``v``, or ``None`` when slot ``v`` is label ``v``;
- ``drawable``: the slots that have images, or ``None`` when all have (identity-balanced sampling
  draws among these).

At 200M images of 100M identities with sorted labels that is 0.8 GB of int32 labels plus 0.4 GB of
starts; the int64 argsort of unsorted labels costs 1.6 GB transiently and leaves a 0.8 GB ``order``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dcq.errors import DcqError

__all__ = ["LabelGroups", "index_dtype", "narrow_int"]

_CHUNK = 1 << 24


def index_dtype(n: int) -> np.dtype:
    """int32 for positions below 2^31, else int64."""
    return np.dtype(np.int32) if n < 2**31 else np.dtype(np.int64)


def narrow_int(values: np.ndarray) -> np.ndarray:
    """int32 when every value fits, else int64 (no copy when the dtype is already that)."""
    if values.size == 0 or (np.iinfo(np.int32).min <= values.min() and values.max() <= np.iinfo(np.int32).max):
        return values.astype(np.int32, copy=False)
    return values.astype(np.int64, copy=False)


@dataclass
class LabelGroups:
    labels: np.ndarray
    starts: np.ndarray
    order: np.ndarray | None = None
    values: np.ndarray | None = None
    drawable: np.ndarray | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_labels(cls, labels) -> LabelGroups:
        """Group any 1-D integer label array (sorted or not, values need not be contiguous)."""
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0:
            raise DcqError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise DcqError(f"labels must be integers, got dtype {labels.dtype}")
        n = labels.size
        idx = index_dtype(n)
        if _is_sorted(labels):
            order, sorted_labels = None, labels
        else:
            order = np.argsort(labels, kind="stable").astype(idx)
            sorted_labels = labels[order]
        pieces = [np.zeros(1, dtype=idx)]
        for lo in range(0, n - 1, _CHUNK):
            seg = sorted_labels[lo:lo + _CHUNK + 1]
            pieces.append((np.flatnonzero(seg[1:] != seg[:-1]) + (lo + 1)).astype(idx))
        pieces.append(np.array([n], dtype=idx))
        starts = np.concatenate(pieces)
        values = narrow_int(np.asarray(sorted_labels[starts[:-1]]))
        if values[0] == 0 and values[-1] == values.size - 1:  # unique and sorted, so 0..V-1 exactly
            values = None
        return cls(labels=labels, starts=starts, order=order, values=values)

    @classmethod
    def from_counts(cls, labels, counts, order=None) -> LabelGroups:
        """Groups of labels ``0..C-1`` with ``counts[c]`` images each (empty identities allowed)."""
        counts = np.asarray(counts, dtype=np.int64)
        n = int(counts.sum())
        starts = np.zeros(counts.size + 1, dtype=index_dtype(n))
        np.cumsum(counts, out=starts[1:])
        drawable = None
        if np.any(counts == 0):
            drawable = np.flatnonzero(counts).astype(index_dtype(counts.size))
        return cls(labels=labels, starts=starts, order=order, drawable=drawable)

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays to cache (``labels`` excluded: it is stored on its own)."""
        out = {"starts": self.starts}
        for name in ("order", "values", "drawable"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    # ------------------------------------------------------------------ queries
    @property
    def num_images(self) -> int:
        return int(self.starts[-1])

    @property
    def num_slots(self) -> int:
        return int(self.starts.size - 1)

    @property
    def num_drawable(self) -> int:
        return self.num_slots if self.drawable is None else int(self.drawable.size)

    def slot_of(self, images: np.ndarray) -> np.ndarray:
        """Slot (identity) of each image."""
        lab = np.asarray(self.labels[images]).astype(np.int64, copy=False)
        if self.values is None:
            return lab
        return np.searchsorted(self.values, lab).astype(np.int64)

    def drawable_slot(self, j: np.ndarray) -> np.ndarray:
        """The ``j``-th slot that has images."""
        return j if self.drawable is None else self.drawable[j].astype(np.int64)

    def image_at(self, sorted_pos: np.ndarray) -> np.ndarray:
        """Image at positions of the label-sorted order."""
        if self.order is None:
            return np.asarray(sorted_pos, dtype=np.int64)
        return self.order[sorted_pos].astype(np.int64)

    def members(self, slot: int) -> np.ndarray:
        """Images of one slot, ascending."""
        lo, hi = int(self.starts[slot]), int(self.starts[slot + 1])
        if self.order is None:
            return np.arange(lo, hi, dtype=np.int64)
        return np.sort(self.order[lo:hi]).astype(np.int64)


def _is_sorted(a: np.ndarray) -> bool:
    for lo in range(0, a.size - 1, _CHUNK):
        seg = a[lo:lo + _CHUNK + 1]
        if np.any(seg[1:] < seg[:-1]):
            return False
    return True
