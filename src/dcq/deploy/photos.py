"""Face images from files for deployment: a decoded, aligned or resized crop, or the reason it failed.

A job over a photo collection must not stop at its first broken file, so `load_crop` raises
`BadImage` (to be listed and skipped) instead of `DcqError`. Crops given as aligned images are
decoded and resized exactly as `dcq embed CKPT` does (Pillow; JPEG draft decoding; box filter when
shrinking, bilinear when enlarging), so the two paths embed the same pixels. Photos with landmarks
are warped by `dcq.align` at full resolution. numpy and Pillow only.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from dcq.align import align_face
from dcq.errors import DcqError


class BadImage(Exception):
    """A file that cannot be embedded (unreadable, undecodable, no landmarks); the message says why."""


def _decode(data: bytes, size: int | None):
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as pil:
            if size is not None and pil.format == "JPEG":
                pil.draft("RGB", (size, size))  # libjpeg decodes at 1/2, 1/4, 1/8 scale when far larger
            return pil.convert("RGB")
    except Image.UnidentifiedImageError:
        raise BadImage("not a known image format (JPEG, PNG, BMP, ...)") from None
    except Image.DecompressionBombError:
        raise BadImage("too many pixels to decode safely (Pillow's decompression-bomb guard)") from None
    except Exception as exc:  # Pillow raises many types for a broken file
        raise BadImage(f"cannot decode ({type(exc).__name__}: {str(exc)[:100]})") from None


def resized(pil, size: int) -> np.ndarray:
    """``pil`` as uint8 (size, size, 3): box filter when shrinking, bilinear when enlarging."""
    from PIL import Image

    if pil.size == (size, size):
        return np.asarray(pil, dtype=np.uint8)
    shrinking = size < pil.size[0] or size < pil.size[1]
    return np.asarray(pil.resize((size, size), Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR))


def load_crop(path: Path, size: int, landmarks: np.ndarray | None = None) -> np.ndarray:
    """uint8 (size, size, 3) RGB: the photo at ``path`` aligned by its 5 ``landmarks``, or, without
    landmarks, the file taken as an aligned crop and resized. Raises `BadImage`."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BadImage(f"cannot read ({exc.strerror or exc})") from None
    if landmarks is None:
        return resized(_decode(data, size), size)
    try:
        return align_face(_decode(data, None), landmarks, size)
    except DcqError as exc:
        raise BadImage(str(exc)) from None


class LandmarkLookup:
    """Landmarks of an image file by the name it has in the landmark file: the path as given, the
    path relative to the folder it was found in, or its file name (insightface's IJB files)."""

    def __init__(self, landmarks: dict[str, tuple[np.ndarray, float | None]], roots: list[Path]):
        self.landmarks = landmarks
        self.roots = [r for r in roots if r.is_dir()]

    def __call__(self, path: Path) -> np.ndarray:
        names = [str(path), path.as_posix()]
        for root in self.roots:
            try:
                names.append(path.relative_to(root).as_posix())
            except ValueError:
                pass
        names.append(path.name)
        for name in names:
            if name in self.landmarks:
                return self.landmarks[name][0]
        raise BadImage("no landmarks for it in the landmark file (looked up by path, path inside its folder, "
                       "and file name)")
