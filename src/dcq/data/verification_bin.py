"""insightface verification ``.bin`` files (lfw.bin, cfp_fp.bin, agedb_30.bin, ...).

A ``.bin`` is a pickle of ``(bins, issame_list)``: ``bins`` holds 2*P encoded images, pair ``i`` is
``bins[2i], bins[2i+1]``, and ``issame_list`` holds P booleans. Pickle runs code on load, and these
files are passed around the internet, so they are read with an unpickler that can only build the
handful of types the format uses; anything else is refused before it is constructed.
"""

from __future__ import annotations

import mmap
import os
import pickle
from pathlib import Path

import numpy as np

from dcq.atomic import atomic_write
from dcq.errors import DcqError

__all__ = ["read_bin", "write_bin"]


def _numpy_attr(modules: tuple[str, ...], name: str):
    """Resolve a numpy internal under numpy 1.x (numpy.core) or 2.x (numpy._core) without warnings."""
    import importlib

    for mod in modules:
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    raise AttributeError(name)


_LATIN1_NAMES = {"latin1", "latin-1", "iso8859-1", "iso-8859-1", "l1"}


def _latin1_encode(text, encoding="latin1", errors="strict"):
    """Stand-in for ``_codecs.encode``: python3 pickles ``bytes`` with protocol<3 as encode(str, 'latin1').

    Only latin-1 is admitted, so the codec machinery cannot be asked to import anything else.
    """
    if str(encoding).lower().replace("_", "-") not in _LATIN1_NAMES:
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1", errors)


# (module, name) -> how to resolve it. Python 2 module names are mapped to python 3 ones by the
# unpickler itself (fix_imports=True) before find_class is called.
_ALLOWED: dict[tuple[str, str], object] = {
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("builtins", "dict"): dict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytes"): bytes,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "bool"): bool,
    ("builtins", "int"): int,
    ("builtins", "float"): float,
    ("builtins", "str"): str,
    ("_codecs", "encode"): _latin1_encode,
    ("codecs", "encode"): _latin1_encode,
}
_NUMPY: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _NUMPY[(_mod, "_reconstruct")] = (("numpy._core.multiarray", "numpy.core.multiarray"), "_reconstruct")
    _NUMPY[(_mod, "scalar")] = (("numpy._core.multiarray", "numpy.core.multiarray"), "scalar")
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _NUMPY[(_mod, "_frombuffer")] = (("numpy._core.numeric", "numpy.core.numeric"), "_frombuffer")
_NUMPY[("numpy", "ndarray")] = (("numpy",), "ndarray")
_NUMPY[("numpy", "dtype")] = (("numpy",), "dtype")
_NUMPY[("numpy", "bool_")] = (("numpy",), "bool_")


def _find_offset(path: str, module: str, name: str) -> int:
    """Byte offset of a refused global's name in the file (the C unpickler reads ahead, so tell() is useless)."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for needle in (f"{module}\n{name}\n", module, name):
                pos = mm.find(needle.encode("utf-8"))
                if pos >= 0:
                    return pos
    except (OSError, ValueError):
        pass
    return -1


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only containers, bytes, scalars and plain numpy arrays; names the first refused global."""

    def __init__(self, file, path: str, **kwargs):
        super().__init__(file, **kwargs)
        self._file = file
        self._path = path

    def find_class(self, module: str, name: str):
        key = (module, name)
        if key in _ALLOWED:
            return _ALLOWED[key]
        if key in _NUMPY:
            mods, attr = _NUMPY[key]
            return _numpy_attr(mods, attr)
        offset = _find_offset(self._path, module, name)
        hint = (
            "convert it with mxnet first (mx.nd arrays -> bytes)" if module.startswith("mxnet")
            else "only (list of image bytes, list of bools) pickles are accepted; do not load files you do not trust"
        )
        raise DcqError(
            f"{self._path}: refused to load global '{module}.{name}' from the pickle near byte offset "
            f"{offset}; a verification .bin never needs it — {hint}"
        )


def _load(path: str, encoding: str):
    with open(path, "rb") as f:
        return _RestrictedUnpickler(f, path, encoding=encoding).load()


def _as_bytes(item, path: str, i: int) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, (bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()
    if isinstance(item, str):  # python 2 str read with a text encoding
        return item.encode("latin1")
    raise DcqError(
        f"{path}: image {i} is a {type(item).__name__}, expected encoded image bytes; "
        "the file is not an insightface verification .bin"
    )


def read_bin(path) -> tuple[list[bytes], np.ndarray]:
    """Read ``(images, issame)`` from an insightface ``.bin``: 2*P encoded images and P booleans."""
    path = str(path)
    if not os.path.isfile(path):
        raise DcqError(f"{path}: verification .bin not found; check the path (e.g. data/lfw.bin)")
    try:
        # python 2 pickles store images as str: encoding='bytes' turns them back into bytes.
        obj = _load(path, "bytes")
    except DcqError:
        raise
    except Exception:  # noqa: BLE001 - a py2 numpy pickle needs latin1; retry once, report that error
        try:
            obj = _load(path, "latin1")
        except DcqError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise DcqError(
                f"{path}: not a readable verification .bin ({type(exc).__name__}: {exc}); "
                "expected a pickle of (list of image bytes, list of bools)"
            ) from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise DcqError(
            f"{path}: expected a pickled pair (images, issame_list), got {type(obj).__name__}"
            f"{' of length ' + str(len(obj)) if isinstance(obj, (tuple, list)) else ''}"
        )
    bins, issame = obj
    if isinstance(bins, np.ndarray) and bins.dtype != object:
        raise DcqError(f"{path}: images are a {bins.dtype} array, expected a list of encoded image bytes")
    images = [_as_bytes(b, path, i) for i, b in enumerate(bins)]
    try:
        issame_arr = np.asarray(list(issame), dtype=bool).reshape(-1)
    except (TypeError, ValueError):
        raise DcqError(f"{path}: issame_list is not a list of booleans") from None
    if len(images) != 2 * len(issame_arr):
        raise DcqError(
            f"{path}: {len(images)} images but {len(issame_arr)} issame flags; a .bin needs exactly "
            "2 images per pair"
        )
    return images, issame_arr


def write_bin(path, images, issame) -> None:
    """Write an insightface-compatible ``.bin`` atomically (temp file in the same folder, then rename).

    Protocol 4 so insightface's python 3 loaders (``pickle.load(f, encoding='bytes')``) read it.
    """
    path = Path(path)
    images = [_as_bytes(b, str(path), i) for i, b in enumerate(images)]
    flags = [bool(x) for x in np.asarray(issame).reshape(-1)]
    if len(images) != 2 * len(flags):
        raise DcqError(
            f"write_bin({path}): {len(images)} images for {len(flags)} pairs; pass 2 images per issame flag"
        )
    atomic_write(path, lambda f: pickle.dump((images, flags), f, protocol=4))

