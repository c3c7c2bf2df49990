"""The output folder of one training run: every file name in it, a lock, a refusal to mix runs,
and its checkpoints.

- what a run folder holds is named here and nowhere else (`RunFiles`), so ``--overwrite`` removes
  exactly what a run writes;
- one ``dcq train`` per folder at a time: an advisory lock on ``.dcq.lock``, released by the kernel
  when the process dies, so a ``kill -9`` never leaves the folder locked;
- a folder that already holds a run (checkpoints, ``final.pt`` or ``steps.jsonl``) is refused unless
  the run is resumed or ``--overwrite`` asks for the earlier run's files to be removed first;
- temporary files that a killed writer left behind (``.NAME.*.tmp``) are removed on the next start;
- training checkpoints are the files named exactly ``step_<digits>.pt``: stray names such as
  ``step_backup.pt`` or ``step_00000010 (copy).pt`` are never read, counted or deleted. The newest is
  the one written last (modification time, then step number), so a run that was rolled back to an
  earlier checkpoint does not resume the abandoned branch.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from dcq.errors import DcqError
from dcq.lock import FileLock
from dcq.lock import remove_stale_temporaries as _remove_temporaries

LOCK_NAME = ".dcq.lock"
STEP_PATTERN = re.compile(r"step_(\d+)\.pt")


@dataclass(frozen=True)
class RunFiles:
    """The paths of everything a run writes into its output folder."""

    root: Path

    FINAL = "final.pt"  # export: encoders, threshold, config (what eval/embed/export read)
    BEST = "best.pt"  # export at the best verification accuracy so far
    STEPS = "steps.jsonl"  # one JSON record per step (loss, accuracy, lr)
    LOG = "train.log"  # the run's log lines
    CONFIG = "config.yaml"  # the resolved config
    TENSORBOARD = "tb"  # TensorBoard event folder
    FILES = (FINAL, BEST, STEPS, LOG, CONFIG)
    FOLDERS = (TENSORBOARD,)

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def final(self) -> Path:
        return self.root / self.FINAL

    @property
    def best(self) -> Path:
        return self.root / self.BEST

    @property
    def steps(self) -> Path:
        return self.root / self.STEPS

    @property
    def log(self) -> Path:
        return self.root / self.LOG

    @property
    def config(self) -> Path:
        return self.root / self.CONFIG

    @property
    def tensorboard(self) -> Path:
        return self.root / self.TENSORBOARD

    def checkpoint(self, step: int) -> Path:
        """The training checkpoint of `step`."""
        return self.root / f"step_{int(step):08d}.pt"


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of a training checkpoint's file name (exactly ``step_<digits>.pt``), else None: stray
    names such as ``step_backup.pt`` or ``step_00000010 (copy).pt`` are not checkpoints."""
    match = STEP_PATTERN.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """The training checkpoints in `directory`, oldest first: by modification time, then step, so
    that after a rollback the checkpoints written last count as the newest, whatever their step."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        step = checkpoint_step(path)
        if step is not None and path.is_file():
            found.append((path.stat().st_mtime_ns, step, path))
    return [path for _, _, path in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest training checkpoint in `directory`, or None."""
    found = checkpoint_files(directory)
    return found[-1] if found else None


def prune_checkpoints(directory: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the `keep_last` newest training checkpoints; returns what was deleted."""
    stale = checkpoint_files(directory)[:-keep_last] if keep_last > 0 else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def set_aside_later_checkpoints(directory: str | os.PathLike, step: int) -> list[Path]:
    """Rename checkpoints beyond `step` (the abandoned branch of a rolled-back run) to
    ``abandoned_step_*.pt`` so that neither `--resume` nor pruning mistakes them for this run's."""
    moved = []
    for path in checkpoint_files(directory):
        if checkpoint_step(path) > step:
            target = path.with_name(f"abandoned_{path.name}")
            os.replace(path, target)
            moved.append(target)
    return moved


def holds_run(directory: str | os.PathLike) -> bool:
    files = RunFiles(directory)
    return bool(checkpoint_files(directory)) or files.final.exists() or files.steps.exists()


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Remove ``.NAME.*.tmp`` files a killed writer left in `directory` (call with the lock held)."""
    return _remove_temporaries(directory)


class RunFolder:
    """Claims an output folder for one run: ``claim()`` locks it and checks it may take the run,
    ``begin()`` prepares it when the run starts, ``release()`` unlocks it (and removes what
    ``claim()`` created when the run never started)."""

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory)
        self._lock_file: FileLock | None = None
        self._created: list[Path] = []
        self._replace = False

    def claim(self, resume: bool, overwrite: bool) -> None:
        """Lock the folder and check it may take this run; changes nothing in it (but for creating
        the folder and lock file, removed again by ``release(started=False)``). Raises DcqError when
        the folder is locked by another run, holds an earlier run (without resume/overwrite), or
        cannot be written."""
        self._make_folder()
        self._lock()
        self._replace = holds_run(self.path) and not resume
        if self._replace and not overwrite:
            self.release(started=False)
            raise DcqError(
                f"output folder {self.path} already holds a run (checkpoints, final.pt or steps.jsonl); "
                "continue it with --resume, pass --overwrite to replace it, or set another output"
            )

    def begin(self, resume_step: int | None = None) -> list[str]:
        """The run starts: record the lock holder, remove the earlier run (--overwrite), temporary
        files of interrupted writes, and (resuming at `resume_step`) set aside checkpoints of an
        abandoned later branch. Returns lines worth logging."""
        notes = []
        if self._lock_file is not None:
            self._lock_file.record_holder()  # who holds the lock, for the message another run prints
        if self._replace:
            notes.append(f"--overwrite: removed {self._remove_run_files()} files of the earlier run in {self.path}")
        stale = remove_stale_temporaries(self.path)
        if stale:
            notes.append(f"removed {len(stale)} temporary files left by an interrupted write: "
                         + ", ".join(p.name for p in stale[:5]))
        if resume_step is not None:
            for moved in set_aside_later_checkpoints(self.path, resume_step):
                notes.append(f"{moved.name}: a checkpoint ahead of step {resume_step} from an abandoned run, "
                             "set aside")
        self._created = []
        return notes

    def release(self, started: bool = True) -> None:
        if self._lock_file is not None:
            self._lock_file.release()
            self._lock_file = None
        if not started:
            for path in self._created:
                if path.is_dir():
                    try:
                        path.rmdir()  # only if still empty
                    except OSError:
                        pass
                else:
                    path.unlink(missing_ok=True)
            self._created = []

    # -- internals --------------------------------------------------------------------------
    def _make_folder(self) -> None:
        missing = []
        for parent in [self.path, *self.path.parents]:
            if parent.exists():
                break
            missing.append(parent)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise DcqError(f"output {self.path} is a file, not a folder; set output to a folder") from None
        except OSError as exc:
            raise DcqError(f"cannot create output folder {self.path}: {exc.strerror or exc}") from None
        if not self.path.is_dir():
            raise DcqError(f"output {self.path} is a file, not a folder; set output to a folder")
        self._created = missing  # deepest first, so rmdir works from the inside out

    def _lock(self) -> None:
        # A POSIX record lock (dcq.lock): DataLoader workers forked from this process do not
        # inherit it, so it ends exactly when this process does, kill -9 included.
        lock = FileLock(self.path / LOCK_NAME, f"output folder {self.path}")
        try:
            lock.acquire("another dcq train", "wait for it to finish or set another output")
        except OSError as exc:
            self.release(started=False)
            raise DcqError(f"cannot write to output folder {self.path}: {exc.strerror or exc}") from None
        if lock.created:
            self._created.insert(0, lock.path)
        self._lock_file = lock

    def _remove_run_files(self) -> int:
        count = 0
        for path in checkpoint_files(self.path) + [self.path / n for n in RunFiles.FILES]:
            if path.is_file():
                path.unlink()
                count += 1
        for name in RunFiles.FOLDERS:
            if (self.path / name).is_dir():
                shutil.rmtree(self.path / name)
                count += 1
        return count
