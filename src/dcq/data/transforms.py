"""Image decoding and the two tensor transforms (train / eval) used by every dataset.

Face-recognition nets are trained on aligned crops, so there is no cropping or colour jitter
here: the only train-time augmentation insightface uses is a horizontal flip. Pixels map to
[-1, 1] with ``(x - 127.5) / 127.5``, the insightface convention, so checkpoints and the ONNX
export agree with models trained there.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import get_worker_info

from dcq.errors import DcqError
from dcq.seeds import stream_seed

__all__ = ["EvalTransform", "TrainTransform", "decode_image", "resize_image", "to_tensor"]

_BytesLike = (bytes, bytearray, memoryview)


def resize_image(img: np.ndarray, image_size: int) -> np.ndarray:
    """Resize a uint8 HxWx3 array to image_size x image_size (area when shrinking, bilinear otherwise)."""
    h, w = img.shape[:2]
    if h == image_size and w == image_size:
        return img
    pil = Image.fromarray(img)
    shrinking = image_size < h or image_size < w
    pil = pil.resize((image_size, image_size), Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR)
    return np.array(pil)


def _as_rgb_array(img: np.ndarray) -> np.ndarray:
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


def decode_image(data, image_size: int | None = None, *, where: str = "") -> np.ndarray:
    """Decode JPEG/PNG/BMP bytes to uint8 HxWx3 RGB, resized to image_size when it differs.

    ``where`` (e.g. "train.rec record 17 at byte 4096") is put in the error message so a corrupt
    record can be found. Already-decoded uint8 arrays are passed through (and resized).
    """
    if isinstance(data, np.ndarray):
        img = _as_rgb_array(data)
    elif isinstance(data, _BytesLike):
        try:
            with Image.open(io.BytesIO(data)) as pil:
                if image_size is not None and pil.format == "JPEG":
                    # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the stored image is much larger.
                    pil.draft("RGB", (image_size, image_size))
                img = np.array(pil.convert("RGB"))
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
            loc = f" ({where})" if where else ""
            reason = "not a known image format" if isinstance(exc, UnidentifiedImageError) else str(exc)
            if isinstance(exc, Image.DecompressionBombError):
                reason = f"too many pixels to decode safely (Pillow's decompression-bomb guard: {exc})"
            raise DcqError(
                f"cannot decode image{loc}: {reason}; the record is corrupt or not JPEG/PNG/BMP — "
                "re-create the file or train with on_bad_record='skip'"
            ) from None
    else:
        raise DcqError(f"expected encoded image bytes or a uint8 numpy array, got {type(data).__name__}")
    if image_size is not None:
        img = resize_image(img, int(image_size))
    return img


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 (or NxHxWx3) -> float32 3xHxW (or Nx3xHxW) in [-1, 1]."""
    img = np.ascontiguousarray(img)
    if not img.flags.writeable:  # e.g. np.asarray(PIL image); torch wants writable memory
        img = img.copy()
    t = torch.from_numpy(img)
    if t.dim() == 3:
        t = t.permute(2, 0, 1)
    elif t.dim() == 4:
        t = t.permute(0, 3, 1, 2)
    else:
        raise DcqError(f"to_tensor expects HxWx3 or NxHxWx3 uint8, got shape {tuple(t.shape)}")
    return t.float().sub_(127.5).div_(127.5).contiguous()


class EvalTransform:
    """bytes or uint8 array -> normalised 3xHxW tensor, no randomness (evaluation, embedding)."""

    def __init__(self, image_size: int = 112):
        self.image_size = int(image_size)

    def __call__(self, data) -> torch.Tensor:
        return to_tensor(decode_image(data, self.image_size))

    def __repr__(self) -> str:
        return f"EvalTransform(image_size={self.image_size})"


class TrainTransform:
    """EvalTransform plus a random horizontal flip with probability 0.5.

    With ``seed=None`` the flip draws from torch's global RNG, which DataLoader seeds differently
    in every worker, so runs are reproducible through ``torch.manual_seed``. With an integer seed
    the transform owns a generator seeded from (seed, worker id), created lazily in each process
    so forked workers do not share one stream.
    """

    def __init__(self, image_size: int = 112, flip: bool = True, seed: int | None = None):
        self.image_size = int(image_size)
        self.flip = bool(flip)
        self.seed = seed
        self._gen: torch.Generator | None = None
        self._gen_owner: tuple | None = None

    def _generator(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        info = get_worker_info()
        owner = (None if info is None else info.id,)
        if self._gen is None or self._gen_owner != owner:
            worker = 0 if info is None else info.id + 1
            self._gen = torch.Generator().manual_seed(stream_seed(self.seed, worker))
            self._gen_owner = owner
        return self._gen

    def should_flip(self) -> bool:
        if not self.flip:
            return False
        return bool(torch.rand((), generator=self._generator()) < 0.5)

    def __call__(self, data) -> torch.Tensor:
        img = decode_image(data, self.image_size)
        if self.should_flip():
            img = img[:, ::-1]
        return to_tensor(img)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_gen"] = None  # generators are re-created per process
        state["_gen_owner"] = None
        return state

    def __repr__(self) -> str:
        return f"TrainTransform(image_size={self.image_size}, flip={self.flip}, seed={self.seed})"
