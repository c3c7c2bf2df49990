"""An embedding set: what `dcq embed` writes, read the same way by every command that takes one.

Two forms: an ``(N, d)`` float ``.npy`` (`dcq embed CKPT ... --out FILE.npy`), or a folder of
``.npy`` shards with ``manifest.json`` (`dcq embed --onnx`, `dcq.deploy.embed_job`), whose manifest
gives the model fingerprint and the image of each row. `dcq gallery` enrols and searches them;
`dcq eval --distractors / --megaface-distractors` ranks probes among them. Arrays stay
memory-mapped: a million distractors are read block by block, never loaded whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dcq.errors import DcqError

__all__ = ["EmbeddingSet", "read_embedding_set"]

_CHECK_BLOCK = 65536


@dataclass
class EmbeddingSet:
    path: Path
    parts: list[np.ndarray]  # (rows, d) float arrays in row order (memory-mapped)
    names: list[str] | None  # the image of each row, when the set records it
    fingerprint: str | None  # the model's fingerprint (`dcq.deploy.metadata.model_fingerprint`), when known
    preprocessing: dict | None = None  # colour order, mean and std the rows were embedded with, when known
    flip: bool | None = None  # whether the rows are flip-test sums, when known

    def origin(self) -> dict:
        """What a gallery records and checks of where rows came from."""
        return {"fingerprint": self.fingerprint, "preprocessing": self.preprocessing, "flip": self.flip}

    @property
    def rows(self) -> int:
        return sum(len(p) for p in self.parts)

    def array(self) -> np.ndarray:
        """All rows as one (N, d) array (the memory-mapped file itself for an ``.npy``)."""
        if len(self.parts) == 1:
            return self.parts[0]
        if not self.parts:
            return np.empty((0, 0), dtype=np.float32)
        return np.concatenate(self.parts)


def _load_npy(path: Path, where: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DcqError(f"{where}: not an .npy embedding array ({str(exc)[:120]})") from None


def _check(parts: list[np.ndarray], where: str, check_finite: bool) -> None:
    dims = set()
    for arr in parts:
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
            raise DcqError(f"{where}: expected (N, d) float embeddings, got {arr.dtype} {arr.shape}")
        dims.add(arr.shape[1])
    if len(dims) > 1:
        raise DcqError(f"{where}: shards of different embedding sizes {sorted(dims)}; embed the set again")
    if check_finite:
        bad = sum(int((~np.isfinite(a[i:i + _CHECK_BLOCK])).any(axis=1).sum())
                  for a in parts for i in range(0, len(a), _CHECK_BLOCK))
        if bad:
            raise DcqError(f"{where}: {bad} of {sum(len(a) for a in parts)} embeddings hold NaN or Inf; "
                           "re-create them with `dcq embed`")


def read_embedding_set(path, model=None, option: str = "", check_finite: bool = True) -> EmbeddingSet:
    """The embedding set at ``path`` (an ``.npy`` or a `dcq embed --onnx` folder).

    ``model``: the ``.onnx`` the rows were embedded with; for a folder it is checked against the
    manifest, for an ``.npy`` its fingerprint becomes the set's. ``option`` (e.g. "--distractors")
    starts every error line, so the user knows which argument to fix."""
    from dcq.deploy.metadata import fingerprint_of, preprocessing_of

    path = Path(path)
    where = f"{option} {path}".strip()
    if path.is_dir():
        from dcq.deploy.embed_job import read_shards

        parts, names, manifest = read_shards(path)
        fingerprint = manifest.get("fingerprint")
        preprocessing, flip = manifest.get("preprocessing"), manifest.get("flip")
        if not parts:  # nothing embedded yet: no rows, of the manifest's size
            parts = [np.empty((0, int(manifest.get("embedding_size") or 0)), dtype=np.float32)]
        if model is not None and fingerprint_of(model) != fingerprint:
            raise DcqError(f"--model {model} is not the model {path} was embedded with ({manifest.get('model')})")
    elif path.is_file():
        parts, names = [_load_npy(path, where)], None
        fingerprint = fingerprint_of(model) if model is not None else None
        preprocessing, flip = (preprocessing_of(model) if model is not None else None), None
    else:
        raise DcqError(f"{where}: no such embedding file or folder; make one with `dcq embed MODEL IMAGES... "
                       "--out FILE.npy` (or `dcq embed --onnx MODEL IMAGES... --out DIR`)")
    _check(parts, where, check_finite)
    return EmbeddingSet(path, parts, names, fingerprint, preprocessing, flip)
