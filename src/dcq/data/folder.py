"""Image-folder datasets (``root/<identity>/<image>.jpg``) and ``open_dataset`` for any supported path.

Identities are numbered in sorted folder-name order (like torchvision's ImageFolder), so the same
tree always gives the same labels; images inside an identity are sorted by file name.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dcq.data.groups import LabelGroups
from dcq.data.source import FaceSource
from dcq.errors import DcqError

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset", "collect_images", "is_image_file", "load_image",
           "open_dataset"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def is_image_file(name: str) -> bool:
    """An image by its extension (IMAGE_EXTENSIONS), not a hidden file."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def collect_images(paths: list[str]) -> list[Path]:
    """Image files named directly, then those under each folder (recursive, sorted; hidden parts skipped):
    the inputs of `dcq embed`, `dcq align` and `dcq gallery search --onnx`."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f.name)
                            and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif p.is_file():
            found.append(p)
        else:
            raise DcqError(f"{p}: no such image file or folder")
    if not found:
        raise DcqError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {' '.join(paths)}")
    return found


def load_image(path, image_size: int | None = None) -> np.ndarray:
    """uint8 (S, S, 3) RGB of an image file, resized to ``image_size``; one error line when unreadable."""
    from dcq.data.transforms import decode_image

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DcqError(f"{path}: cannot read image ({exc.strerror or exc})") from None
    return decode_image(data, image_size, where=str(path))


class ImageFolderDataset(FaceSource):
    """One folder per identity (a `FaceSource`, like ``FaceRecordIO``).

    Folders without any image are skipped (they would be identities nobody can sample), and the
    numbering counts only the folders kept. A folder that cannot be read stops with one line naming
    it: skipping it would silently renumber every identity after it.
    """

    def __init__(self, root):
        self.root = str(root)
        if not os.path.isdir(self.root):
            raise DcqError(f"{self.root}: image folder not found; expected root/<identity>/<image>.jpg")
        names: list[str] = []
        paths: list[str] = []
        labels: list[int] = []
        with os.scandir(self.root) as it:
            dirs = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
        for name in dirs:
            entries = _entries(os.path.join(self.root, name), f"identity folder {name!r}")
            files = sorted(e.name for e in entries if e.is_file() and is_image_file(e.name))
            for sub in sorted(e.path for e in entries if e.is_dir() and not e.name.startswith(".")):
                if _any_image_below(sub):
                    raise DcqError(
                        f"{sub}: images in a sub-folder of identity {name!r} would not be read; the layout is "
                        "root/<identity>/<image>: move them up into the identity folder or make it an identity"
                    )
            if not files:
                continue
            label = len(names)
            names.append(name)
            paths.extend(os.path.join(self.root, name, f) for f in files)
            labels.extend([label] * len(files))
        if not paths:
            raise DcqError(
                f"{self.root}: no images found in identity folders; expected root/<identity>/<image>"
                f"{{{','.join(IMAGE_EXTENSIONS)}}}"
            )
        self.identity_names: list[str] = names
        self.paths: list[str] = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.raw_labels = self.labels
        self.num_identities = len(names)
        self.groups = LabelGroups.from_labels(self.labels)
        starts = np.searchsorted(self.labels, np.arange(self.num_identities + 1))
        self._starts = starts

    def __len__(self) -> int:
        return len(self.paths)

    def _check_index(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"image index {i} out of range for {len(self)} images")
        return i

    def where(self, i: int) -> str:
        return f"{self.paths[self._check_index(i)]} (image {i})"

    def image_bytes(self, i: int) -> bytes:
        path = self.paths[self._check_index(i)]
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise DcqError(f"{path}: cannot read image {i} ({exc.strerror}); was the folder changed?") from None

    def indices_of(self, identity: int) -> np.ndarray:
        identity = int(identity)
        if not 0 <= identity < self.num_identities:
            raise IndexError(f"identity {identity} out of range for {self.num_identities} identities")
        return np.arange(self._starts[identity], self._starts[identity + 1], dtype=np.int64)

    def __repr__(self) -> str:
        return f"ImageFolderDataset({self.root!r}, images={len(self)}, identities={self.num_identities})"


def _entries(folder: str, what: str) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError as exc:
        raise DcqError(f"{folder}: cannot read {what} ({exc.strerror or exc}); fix its permissions or move it "
                       "out of the dataset") from None


def _any_image_below(folder: str) -> bool:
    for _dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(is_image_file(f) for f in filenames):
            return True
    return False


def _has_identity_folders(path: Path) -> bool:
    """Whether ``path`` holds a folder with images; an unreadable one counts (the dataset then names it)."""
    for e in _entries(str(path), "the dataset folder"):
        if e.is_dir() and not e.name.startswith("."):
            try:
                with os.scandir(e.path) as inner:
                    if any(f.is_file() and is_image_file(f.name) for f in inner):
                        return True
            except OSError:
                return True
    return False


def open_dataset(path, **kwargs):
    """Open a training set by path: a ``.rec``, a folder with ``train.rec``, ``train/``, or identity folders."""
    from dcq.data.recordio import FaceRecordIO

    p = Path(path)
    if p.is_file():
        if p.suffix == ".rec":
            return FaceRecordIO(p, **kwargs)
        raise DcqError(f"{p}: not a dataset; pass a .rec file, a folder with train.rec, or an image folder")
    if not p.exists():
        raise DcqError(f"{p}: dataset not found; run `dcq synth {p}` to create one, or check the path")
    if (p / "train.rec").is_file():
        return FaceRecordIO(p / "train.rec", **kwargs)
    if (p / "train").is_dir() and _has_identity_folders(p / "train"):
        return ImageFolderDataset(p / "train")
    if _has_identity_folders(p):
        return ImageFolderDataset(p)
    raise DcqError(
        f"{p}: no train.rec, train/ or <identity>/<image>.jpg folders found; point at a dataset made by "
        "`dcq synth` or an insightface folder (faces_emore/)"
    )
