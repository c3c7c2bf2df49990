"""Atomic file writes: anything that takes time to produce is never left half-written.

The data goes to a temporary file in the target's folder (same file system), is flushed to disk,
given the permissions a plain `open()` would give, and renamed over the target. A crash at any
point leaves either the old file or the new one; the temporary file is removed on failure.
A write that fails (a read-only or full disk, a target that is a folder) raises one `DcqError`
line naming the file; `ensure_writable` checks the same before a long job starts.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from dcq.errors import DcqError


def _reason(exc: BaseException, folder: Path) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "no space left on the device"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    with contextlib.suppress(OSError):
        if shutil.disk_usage(folder).free < 64 * 2**20:  # torch reports a full disk as "unexpected pos"
            return f"the disk is full ({text[:120]})"
    return text[:200]


def _folder_for(path: Path) -> Path:
    if path.is_dir():
        raise DcqError(f"cannot write {path}: it is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        what = "a part of the path is a file" if isinstance(exc, (FileExistsError, NotADirectoryError)) else _reason(
            exc, path.parent)
        raise DcqError(f"cannot write {path}: {what}") from None
    return path.parent


def _temporary(path: Path) -> tuple[Path, str]:
    folder = _folder_for(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(folder))
    except OSError as exc:
        raise DcqError(f"cannot write {path}: {_reason(exc, folder)}") from None
    os.close(fd)
    return folder, tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block succeeds
    (with the permissions the umask gives), removed when it fails."""
    path = Path(path)
    folder, tmp = _temporary(path)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        raise DcqError(f"cannot write {path}: {_reason(exc, folder)}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(binary_file)`` on a temporary file beside ``path``, then rename it into place."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def ensure_writable(path: str | os.PathLike) -> Path:
    """Fail now, with one line, if ``path`` could not be written later (a probe file beside it)."""
    path = Path(path)
    missing = [p for p in path.parents if not p.exists()]  # deepest first; removed again after the probe
    _folder, tmp = _temporary(path)
    os.unlink(tmp)
    for folder in missing:
        with contextlib.suppress(OSError):
            folder.rmdir()
    return path


def write_json(path: str | os.PathLike, data, indent: int | None = 2) -> Path:
    """``data`` as JSON (one trailing newline), written atomically; numpy scalars become plain numbers."""
    import json

    def plain(value):
        if hasattr(value, "item"):  # numpy scalar or 0-d array
            return value.item()
        raise TypeError(f"{type(value).__name__} is not JSON serialisable")

    text = json.dumps(data, indent=indent, default=plain) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode()))
