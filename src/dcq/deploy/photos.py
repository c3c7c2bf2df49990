"""Face images from files for deployment: a decoded, aligned or resized crop, or the reason it failed.

A job over a photo collection must not stop at its first broken file, so `load_crop` raises
`BadImage` (to be listed and skipped) instead of `DcqError`. Files are decoded by
`dcq.data.decode.decode_bytes` (libjpeg-turbo when installed, Pillow otherwise; JPEGs much larger
than the crop shrunk while decoding), and crops given as aligned images resized by the same
`dcq.data.decode.resize_image` as `dcq embed CKPT` (box filter when shrinking, bilinear when
enlarging), so the two paths embed the same pixels. Photos with landmarks are warped by `dcq.align`
at full resolution, except a JPEG over `dcq.data.decode.MAX_DECODED_PIXELS`, which is decoded shrunk
by 2, 4 or 8 (libjpeg's DCT scaling) with its landmarks scaled alike, so memory stays bounded; other
formats that large are refused. numpy and Pillow only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dcq.align import align_face
from dcq.data.decode import MAX_DECODED_PIXELS, decode_bytes, draft_scale, image_header_size, resize_image
from dcq.deploy.orientation import upright
from dcq.errors import DcqError


class BadImage(Exception):
    """A file that cannot be embedded (unreadable, undecodable, no landmarks); the message says why."""


def _decode(data: bytes, size: int | None, resize: bool = False) -> np.ndarray:
    try:
        return decode_bytes(data, size, resize=resize)
    except DcqError as exc:  # its advice is for training records; keep what went wrong
        raise BadImage(str(exc).split(";")[0]) from None



def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise BadImage(f"cannot read ({exc.strerror or exc})") from None


def load_photo(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) RGB: the photo at ``path`` at full size, upright by its EXIF orientation (the
    frame landmarks are given in). Raises `BadImage`."""
    data = _read(path)
    return upright(data, _decode(data, None))


def load_crop(path: Path, size: int, landmarks: np.ndarray | None = None) -> np.ndarray:
    """uint8 (size, size, 3) RGB: the photo at ``path`` (upright by its EXIF orientation) aligned by
    its 5 ``landmarks``, or, without landmarks, the file taken as an aligned crop and resized.
    Raises `BadImage`."""
    data = _read(path)
    if landmarks is None:
        return resize_image(_decode(data, size, resize=True), size)
    try:
        photo, landmarks = _decode_photo(data, np.asarray(landmarks, dtype=np.float64))
        return align_face(upright(data, photo), landmarks, size)
    except DcqError as exc:
        raise BadImage(str(exc)) from None


def _decode_photo(data: bytes, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The photo decoded whole, or, when that is over the pixel bound, a JPEG shrunk by the
    smallest factor that fits, with the landmarks in the shrunk photo's pixels (the mapping is the
    same in the upright frame, to within a shrunk pixel where a side is not a multiple of the factor)."""
    size = image_header_size(data)
    if size is None or size[0] * size[1] <= MAX_DECODED_PIXELS:
        return _decode(data, None), landmarks
    width, height = size
    factor = next((k for k in (2, 4, 8) if -(-width // k) * -(-height // k) <= MAX_DECODED_PIXELS), 8)
    target = min(width, height) // factor  # what makes the decoder's draft shrink by `factor`
    scale = draft_scale(width, height, target)
    # DCT scaling by s averages s x s blocks: pixel i of the shrunk photo is centred at s*i + (s-1)/2
    return _decode(data, target), (landmarks - (scale - 1) / 2) / scale


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
