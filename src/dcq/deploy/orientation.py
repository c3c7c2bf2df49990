"""EXIF orientation: a photo's pixels turned the way its camera meant them to be seen.

Phones store many photos sideways with an EXIF ``Orientation`` tag instead of rotating the pixels.
A detector run on the stored pixels sees faces lying on their side (and finds few), so detection,
and the alignment that uses its landmarks, work on the upright photo: the decoded array turned as
`PIL.ImageOps.exif_transpose` turns it (tests/test_detect.py holds the two equal for all eight
orientations). Landmark coordinates are therefore in the upright photo, as OpenCV's ``imread``
(which insightface's detector reads with) also gives them.
"""

from __future__ import annotations

import io

import numpy as np

_ORIENTATION_TAG = 0x0112


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1-8) of an encoded image; 1 (as stored) when it has none or it is unreadable."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            value = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a file Pillow cannot parse: the decoder reports it
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def turn(image: np.ndarray, orientation: int) -> np.ndarray:
    """The (H, W, C) array turned upright for an EXIF ``orientation``."""
    if orientation == 2:
        return image[:, ::-1]
    if orientation == 3:
        return image[::-1, ::-1]
    if orientation == 4:
        return image[::-1]
    if orientation == 5:
        return image.transpose(1, 0, 2)
    if orientation == 6:
        return np.rot90(image, -1)
    if orientation == 7:
        return image[::-1, ::-1].transpose(1, 0, 2)
    if orientation == 8:
        return np.rot90(image, 1)
    return image


def upright(data: bytes, image: np.ndarray) -> np.ndarray:
    """``image`` (the decoded pixels of ``data``) turned by the EXIF orientation of ``data``."""
    orientation = exif_orientation(data)
    return image if orientation == 1 else np.ascontiguousarray(turn(image, orientation))
