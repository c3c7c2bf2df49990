"""Encoded image bytes -> uint8 HxWx3 RGB: JPEG through libjpeg-turbo (simplejpeg) when it is installed.

Decoding is most of what a DataLoader worker does. simplejpeg hands the bytes straight to
libjpeg-turbo and returns a numpy array, without Pillow's image object, mode conversion and copy:
about 2x faster on 112 px faces (``docs/data.md``, "Feeding a GPU"). Both run libjpeg-turbo with its
defaults (accurate integer IDCT, smooth chroma upsampling) and the same DCT-domain downscaling that
Pillow's ``draft`` picks, so the pixels are the same (``tests/test_decode.py`` holds them equal).
Pillow still decodes PNG/BMP, CMYK/YCCK JPEGs and anything simplejpeg refuses, so every image either
decodes exactly as Pillow decodes it or fails with the same message as before.

Memory is bounded before decoding: an image whose decoded size (after the DCT-domain shrink) is over
`MAX_DECODED_PIXELS` is refused from its header, by both decoders alike, so a few hundred bytes that
claim 12000 x 12000 pixels cannot make a loader worker or `dcq align` allocate gigabytes.

Which decoder: the ``decoder`` argument, else the ``DCQ_JPEG_DECODER`` environment variable
(DataLoader workers inherit it), else ``auto``:

- ``auto``: simplejpeg when it can be imported, else Pillow (logged once per process);
- ``turbo``: simplejpeg, and an error when it is not installed (``pip install 'dcq[fast-jpeg]'``);
- ``pil``: Pillow only, the path before simplejpeg (for comparison and benchmarks).
"""

from __future__ import annotations

import io
import logging
import os
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from dcq.errors import DcqError

__all__ = ["DECODERS", "ENV_VAR", "MAX_DECODED_PIXELS", "as_rgb_array", "decode_bytes", "draft_scale",
           "image_header_size", "resize_image", "resolve_decoder"]

DECODERS = ("auto", "turbo", "pil")
ENV_VAR = "DCQ_JPEG_DECODER"
# The most pixels decoded at once (8192 x 8192): Pillow holds 4 bytes a pixel and the array 3 more,
# under 0.5 GB; a JPEG larger than this is decoded shrunk (draft) where its use allows it.
MAX_DECODED_PIXELS = 1 << 26

log = logging.getLogger(__name__)

_JPEG_START = b"\xff\xd8\xff"
_TURBO_COLORSPACES = {"YCbCr": "RGB", "Gray": "GRAY"}  # header colour space -> simplejpeg output
_BytesLike = (bytes, bytearray, memoryview)
_simplejpeg = None  # the module once imported; False when it cannot be
_resolved: dict = {}  # (where the choice came from, its text) -> 'turbo' | 'pil'
_fallback_logged = False


def _turbo_module():
    global _simplejpeg
    if _simplejpeg is None:
        try:
            import simplejpeg
        except ImportError:
            _simplejpeg = False
        else:
            _simplejpeg = simplejpeg
    return _simplejpeg or None


def _log_fallback_once() -> None:
    global _fallback_logged
    if not _fallback_logged:
        _fallback_logged = True
        log.warning("simplejpeg is not installed: decoding JPEG with Pillow (pip install 'dcq[fast-jpeg]' "
                    "for libjpeg-turbo decoding, about 2x faster)")


def resolve_decoder(decoder: str | None = None) -> str:
    """'turbo' or 'pil': what ``decoder`` (or ``DCQ_JPEG_DECODER``, default 'auto') means in this process."""
    source = "decoder" if decoder is not None else ENV_VAR
    choice = decoder if decoder is not None else os.environ.get(ENV_VAR, "")
    key = (source, choice)
    if key in _resolved:
        return _resolved[key]
    name = (choice or "auto").strip().lower()
    if name not in DECODERS:
        raise DcqError(f"unknown JPEG decoder {choice!r} ({source}); choose one of {', '.join(DECODERS)}")
    if name != "pil" and _turbo_module() is None:
        if name == "turbo":
            raise DcqError(f"JPEG decoder 'turbo' ({source}) needs simplejpeg, which is not installed; "
                           "pip install 'dcq[fast-jpeg]', or use 'auto' or 'pil'")
        _log_fallback_once()
        name = "pil"
    elif name == "auto":
        name = "turbo"
    _resolved[key] = name
    return name


def draft_scale(width: int, height: int, image_size: int | None) -> int:
    """The DCT-domain shrink factor (1, 2, 4 or 8) Pillow's ``draft`` picks to reach image_size.

    The largest factor that keeps both sides at least ``image_size``; the decoded size is then
    ``ceil(side / factor)``."""
    if image_size is None:
        return 1
    fits = min(width // image_size, height // image_size)
    for s in (8, 4, 2):
        if fits >= s:
            return s
    return 1


def _too_many_pixels(width: int, height: int) -> bool:
    """Where Pillow's decompression-bomb guard refuses an image (so it refuses it for both decoders)."""
    limit = Image.MAX_IMAGE_PIXELS
    return limit is not None and width * height > 2 * limit


def _check_decoded_size(width: int, height: int, where: str) -> None:
    """Refuse, before decoding, an image that would decode to more than `MAX_DECODED_PIXELS`."""
    if width * height > MAX_DECODED_PIXELS:
        loc = f" ({where})" if where else ""
        raise DcqError(f"cannot decode image{loc}: {width}x{height} pixels, more than the {MAX_DECODED_PIXELS:,} "
                       "dcq decodes at once (memory); downscale it, or train with on_bad_record='skip'")


def image_header_size(data) -> tuple[int, int] | None:
    """(width, height) from an image's header without decoding it; None when Pillow cannot tell."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as pil:
                return pil.size
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError):
        return None


def _decode_turbo(sj, data, image_size: int | None) -> np.ndarray | None:
    """simplejpeg's decoding of a JPEG, or None where Pillow must decide (not YCbCr/grey, refused)."""
    try:
        height, width, colorspace, _ = sj.decode_jpeg_header(data)
        out = _TURBO_COLORSPACES.get(colorspace)
        if out is None or _too_many_pixels(width, height):
            return None
        s = draft_scale(width, height, image_size)
        h, w = -(-height // s), -(-width // s)
        if h * w > MAX_DECODED_PIXELS:
            return None  # Pillow refuses it with the same message
        img = sj.decode_jpeg(data, colorspace=out, min_height=h, min_width=w)
    except ValueError:  # corrupt or unsupported: Pillow decodes it or reports it as before
        return None
    if img.shape[:2] != (h, w):
        return None
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return img


def _decode_pil(data, image_size: int | None, where: str, resize: bool = False) -> np.ndarray:
    try:
        with warnings.catch_warnings():  # the size is checked below, against a lower bound than Pillow's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            pil = Image.open(io.BytesIO(data))
        with pil:
            if image_size is not None and pil.format == "JPEG":
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the stored image is much larger.
                pil.draft("RGB", (image_size, image_size))
            _check_decoded_size(*pil.size, where)
            rgb = pil if pil.mode == "RGB" else pil.convert("RGB")  # no second full-size copy
            return np.array(_resized(rgb, image_size) if resize and image_size is not None else rgb)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        loc = f" ({where})" if where else ""
        reason = "not a known image format" if isinstance(exc, UnidentifiedImageError) else str(exc)
        if isinstance(exc, Image.DecompressionBombError):
            reason = f"too many pixels to decode safely (Pillow's decompression-bomb guard: {exc})"
        raise DcqError(
            f"cannot decode image{loc}: {reason}; the record is corrupt or not JPEG/PNG/BMP — "
            "re-create the file or train with on_bad_record='skip'"
        ) from None


def decode_bytes(data, image_size: int | None = None, *, where: str = "", decoder: str | None = None,
                 resize: bool = False) -> np.ndarray:
    """JPEG/PNG/BMP bytes -> uint8 HxWx3 RGB, JPEGs much larger than image_size shrunk while decoding.

    The result is what Pillow gives with ``draft("RGB", (image_size, image_size))`` and
    ``convert("RGB")``; resizing to exactly image_size is the caller's (``decode_image``), or, with
    ``resize``, done here on Pillow's image before the array is made (the same pixels as
    `resize_image`, without a full-size array next to Pillow's)."""
    if not isinstance(data, _BytesLike):
        raise DcqError(f"expected encoded image bytes, got {type(data).__name__}")
    if resolve_decoder(decoder) == "turbo" and bytes(data[:3]) == _JPEG_START:
        img = _decode_turbo(_turbo_module(), data, image_size)
        if img is not None:
            return resize_image(img, image_size) if resize and image_size is not None else img
    return _decode_pil(data, image_size, where, resize)


def as_rgb_array(img: np.ndarray) -> np.ndarray:
    """Accept HxW, HxWx1, HxWx3 or HxWx4 uint8 arrays and return HxWx3 uint8."""
    if not isinstance(img, np.ndarray):
        raise DcqError(f"expected encoded image bytes or a uint8 numpy array, got {type(img).__name__}")
    if img.dtype != np.uint8:
        raise DcqError(f"expected a uint8 image array, got dtype {img.dtype}; convert with .astype(np.uint8)")
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.ndim == 3 and img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    elif not (img.ndim == 3 and img.shape[2] == 3):
        raise DcqError(f"expected an HxWx3 image array, got shape {tuple(img.shape)}")
    return img


def resize_image(img: np.ndarray, image_size: int) -> np.ndarray:
    """Resize a uint8 HxWx3 array to image_size x image_size (area when shrinking, bilinear otherwise)."""
    h, w = img.shape[:2]
    if h == image_size and w == image_size:
        return img
    return np.array(_resized(Image.fromarray(img), image_size))


def _resized(pil, image_size: int):
    """`resize_image` on a Pillow RGB image."""
    w, h = pil.size
    if h == image_size and w == image_size:
        return pil
    shrinking = image_size < h or image_size < w
    return pil.resize((image_size, image_size), Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR)
