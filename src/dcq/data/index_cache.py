"""On-disk cache of a dataset's parsed index: ``.npy`` files memory-mapped back, never trusted blindly.

Parsing a 200M-line ``.idx`` and reading 200M record headers takes minutes; mapping the result back
takes milliseconds. ``IndexCache`` stores named arrays as ``.npy`` files plus an ``index.json`` that
records

- a format version (``VERSION``) and the build parameters,
- the size and modification time (ns) of every source file (``.rec`` and ``.idx``),
- the dtype, shape, byte size and CRC-32 of every array file.

``load()`` returns the arrays (read-only memory maps) only when all of that matches; a stale or corrupt
cache is reported in the log and ignored, and the caller rebuilds it. ``save()`` removes the old
``index.json`` first, writes each array atomically, and the new ``index.json`` last, so an
interrupted save leaves no cache that looks valid.

Where: ``<dataset folder>/.dcq-index/<file name>/`` when that folder is writable, otherwise
``$DCQ_CACHE/<file name>-<hash of its path>/`` (default ``~/.cache/dcq/index``). Both are searched
when loading.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from pathlib import Path

import numpy as np

from dcq.atomic import atomic_write, write_json

__all__ = ["CACHE_ENV", "VERSION", "IndexCache", "user_cache_root"]

log = logging.getLogger(__name__)

VERSION = 1
CACHE_ENV = "DCQ_CACHE"
_META = "index.json"


def user_cache_root() -> Path:
    """``$DCQ_CACHE``, else ``$XDG_CACHE_HOME/dcq/index``, else ``~/.cache/dcq/index``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dcq" / "index"


def _writable(folder: Path) -> bool:
    """Whether new files may be created in ``folder`` (root passes whatever the mode bits say)."""
    return os.access(folder, os.W_OK)


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return crc


class IndexCache:
    """The cached index of the dataset file ``primary``, built from ``sources`` with ``params``.

    ``name`` (default: the file name of ``primary``) names the cache folder.
    """

    def __init__(self, primary, sources, params: dict | None = None, name: str | None = None):
        primary = Path(os.path.abspath(primary))
        name = name or primary.name
        self.primary = primary
        self.sources = [Path(os.path.abspath(p)) for p in sources]
        self.params = dict(params or {})
        digest = hashlib.sha1(str(primary).encode()).hexdigest()[:16]
        self.beside = primary.parent / ".dcq-index" / name
        self.user = user_cache_root() / f"{name}-{digest}"
        self.location: Path | None = None  # where the last load/save found or put it

    def fingerprint(self) -> dict:
        files = []
        for p in self.sources:
            st = p.stat()
            files.append([str(p), st.st_size, st.st_mtime_ns])
        return {"version": VERSION, "sources": files, "params": self.params}

    def locations(self) -> list[Path]:
        return [self.beside, self.user]

    # ------------------------------------------------------------------ load
    def load(self) -> tuple[dict, dict[str, np.ndarray]] | None:
        """``(info, arrays)`` from the first valid cache, or ``None`` (then build and ``save``)."""
        fp = self.fingerprint()
        for folder in self.locations():
            meta_path = folder / _META
            if not meta_path.is_file():
                continue
            try:
                meta = json.loads(meta_path.read_text())
                arrays, reason = self._validate(folder, meta, fp)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                arrays, reason = None, f"unreadable ({exc})"
            if arrays is not None:
                self.location = folder
                return meta["info"], arrays
            log.warning("%s: index cache %s is %s; not using it (it will be rebuilt)", self.primary, folder, reason)
        return None

    @staticmethod
    def _validate(folder: Path, meta: dict, fp: dict):
        if meta.get("fingerprint", {}).get("version") != fp["version"]:
            return None, f"from another cache format (version {meta.get('fingerprint', {}).get('version')})"
        if meta["fingerprint"] != fp:
            return None, "stale (the dataset files or build parameters changed since it was written)"
        arrays = {}
        for name, spec in meta["arrays"].items():
            path = folder / f"{name}.npy"
            if not path.is_file() or path.stat().st_size != spec["bytes"]:
                return None, f"corrupt ({name}.npy is missing or has the wrong size)"
            if _crc32(path) != spec["crc32"]:
                return None, f"corrupt ({name}.npy fails its checksum)"
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            if arr.dtype.str != spec["dtype"] or list(arr.shape) != spec["shape"]:
                return None, f"corrupt ({name}.npy has dtype {arr.dtype} shape {arr.shape})"
            arrays[name] = arr
        return arrays, None

    # ------------------------------------------------------------------ save
    def save(self, info: dict, arrays: dict[str, np.ndarray]) -> Path | None:
        """Write the cache (beside the dataset if possible); returns where, or ``None`` if nowhere."""
        fp = self.fingerprint()
        candidates = []
        probe = self.beside if self.beside.is_dir() else self.primary.parent
        if _writable(probe):
            candidates.append(self.beside)
        candidates.append(self.user)
        for folder in candidates:
            try:
                self._write(folder, fp, info, arrays)
            except OSError as exc:
                log.warning("%s: cannot write the index cache to %s (%s)", self.primary, folder, exc)
                continue
            self.location = folder
            return folder
        log.warning("%s: no writable place for the index cache; it will be rebuilt next time", self.primary)
        return None

    @staticmethod
    def _write(folder: Path, fp: dict, info: dict, arrays: dict[str, np.ndarray]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        meta_path = folder / _META
        if meta_path.exists():
            meta_path.unlink()
        for old in folder.glob("*.npy"):
            if old.stem not in arrays:
                old.unlink()
        specs = {}
        for name, arr in arrays.items():
            arr = np.ascontiguousarray(arr)
            path = atomic_write(folder / f"{name}.npy", lambda f, a=arr: np.save(f, a, allow_pickle=False))
            specs[name] = {"dtype": arr.dtype.str, "shape": list(arr.shape), "bytes": path.stat().st_size,
                           "crc32": _crc32(path)}
        meta = {"fingerprint": fp, "info": info, "arrays": specs}
        write_json(meta_path, meta, indent=1)
