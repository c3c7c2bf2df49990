"""An exclusive advisory lock on a file, held by one process, released by the kernel when it dies.

Two commands writing the same thing at once (two ``dcq train`` into one run folder, two ``dcq gallery
add`` to one gallery, two ``dcq embed --onnx`` into one folder) would each read the old state and the
last writer would silently drop the other's work. A POSIX record lock (``lockf``, not ``flock``)
serialises them: forked DataLoader workers do not inherit it, and ``kill -9`` never leaves it held.
The lock file records the holder's pid, for the message the next process prints.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from dcq.errors import DcqError

__all__ = ["FileLock", "remove_stale_temporaries"]


class FileLock:
    """``acquire()`` takes the lock on ``path`` (created if missing) or raises one `DcqError` line
    saying who holds it; ``release()`` lets it go. ``created`` tells whether acquire made the file."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.path = Path(path)
        self.what = what  # what is locked, as the refusal names it: "output folder runs/x"
        self.fd: int | None = None
        self.created = False

    def acquire(self, busy: str, fix: str = "wait for it to finish") -> FileLock:
        """Lock now or fail with ``f"{what} is in use by {busy} (pid N); {fix}"``; an `OSError` when
        the lock file cannot be created."""
        existed = self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # OSError: the caller says what it was for
        self.created = not existed
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; run unlocked
            self.fd = fd
            return self
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise DcqError(f"{self.what} is in use by {busy}{who}; {fix}") from None
        self.fd = fd
        return self

    def record_holder(self) -> None:
        """Write this process's pid into the lock file (read by the message of a refused process)."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def remove_stale_temporaries(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the ``.NAME.*.tmp`` files (`dcq.atomic`'s) a killed writer left in ``folder``; only those
    of ``name`` when given. Call with the lock of what is written there held."""
    folder = Path(folder)
    pattern = re.compile(r"\..+\.tmp" if name is None else re.escape(f".{name}.") + r"[^/]*\.tmp", re.S)
    removed = []
    if folder.is_dir():
        for path in folder.iterdir():
            if pattern.fullmatch(path.name) and path.is_file():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                removed.append(path)
    return removed
