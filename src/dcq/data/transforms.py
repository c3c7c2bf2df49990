"""Image decoding and the two tensor transforms (train / eval) used by every dataset.

Face-recognition nets are trained on aligned crops, so there is no cropping or colour jitter
here: the only train-time augmentation insightface uses is a horizontal flip. Pixels map to
[-1, 1] with ``(x - 127.5) / 127.5``, the insightface convention, so checkpoints and the ONNX
export agree with models trained there.

The transforms can stop at uint8 (``normalize=False``): a DataLoader worker then hands over a
quarter of the bytes, and ``normalize`` runs in the training process after the copy to the device,
where it costs nothing. ``normalize`` and ``to_tensor`` compute the same float32 values, so the two
orders train identically.

A uint8 training image stays in the decoder's memory order: ``chw_view`` gives the (3, H, W) tensor as
a view of the H x W x 3 pixels (channels-last strides) instead of rearranging 3-byte pixels into planes
on the CPU, which costs a worker core about 8% of its time per image (``docs/data.md``, "Feeding a
GPU"); ``normalize`` makes the float batch contiguous on the device, so the network sees the same
tensor either way.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import get_worker_info

from dcq.data.decode import as_rgb_array, decode_bytes, resize_image, resolve_decoder
from dcq.errors import DcqError
from dcq.seeds import stream_seed

__all__ = ["EvalTransform", "TrainTransform", "chw_view", "decode_image", "normalize", "resize_image",
           "to_chw_uint8", "to_tensor"]

_BytesLike = (bytes, bytearray, memoryview)


def decode_image(data, image_size: int | None = None, *, where: str = "", decoder: str | None = None) -> np.ndarray:
    """Decode JPEG/PNG/BMP bytes to uint8 HxWx3 RGB, resized to image_size when it differs.

    ``where`` (e.g. "train.rec record 17 at byte 4096") is put in the error message so a corrupt
    record can be found. Already-decoded uint8 arrays are passed through (and resized). ``decoder``:
    'auto', 'turbo' or 'pil' (see ``dcq.data.decode``; default: ``DCQ_JPEG_DECODER``, else auto).
    """
    if isinstance(data, np.ndarray):
        img = as_rgb_array(data)
    elif isinstance(data, _BytesLike):
        img = decode_bytes(data, image_size, where=where, decoder=decoder, resize=True)
    else:
        raise DcqError(f"expected encoded image bytes or a uint8 numpy array, got {type(data).__name__}")
    if image_size is not None:
        img = resize_image(img, int(image_size))
    return img


def to_chw_uint8(img: np.ndarray, flip: bool = False) -> torch.Tensor:
    """uint8 HxWx3 (or NxHxWx3) -> uint8 3xHxW (or Nx3xHxW) tensor in its own memory, mirrored left-right
    when ``flip``: one copy does the layout change and the flip."""
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim not in (3, 4) or img.shape[-1] != 3:
        raise DcqError(f"expected uint8 HxWx3 or NxHxWx3 images, got {img.dtype} {tuple(img.shape)}")
    view = img[..., ::-1, :] if flip else img
    axes = (2, 0, 1) if img.ndim == 3 else (0, 3, 1, 2)
    return torch.from_numpy(np.array(view.transpose(axes), order="C"))


def chw_view(img: np.ndarray, flip: bool = False) -> torch.Tensor:
    """uint8 HxWx3 (or NxHxWx3) -> uint8 3xHxW (or Nx3xHxW) over the same pixels (channels-last strides).

    No copy without ``flip``; with it one copy in pixel order (torch's flip). The values are
    ``to_chw_uint8``'s; only the memory order differs, and ``normalize`` makes it contiguous."""
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim not in (3, 4) or img.shape[-1] != 3:
        raise DcqError(f"expected uint8 HxWx3 or NxHxWx3 images, got {img.dtype} {tuple(img.shape)}")
    t = torch.from_numpy(img if img.flags.writeable else img.copy())
    if flip:
        t = t.flip(-2)
    return t.permute(2, 0, 1) if t.dim() == 3 else t.permute(0, 3, 1, 2)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (any memory order, any device) -> contiguous float32 in [-1, 1]: ``(x - 127.5) / 127.5``."""
    if x.dtype != torch.uint8:
        raise DcqError(f"normalize expects uint8 images, got dtype {x.dtype}")
    return x.contiguous().float().sub_(127.5).div_(127.5)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 (or NxHxWx3) -> float32 3xHxW (or Nx3xHxW) in [-1, 1]."""
    return normalize(to_chw_uint8(img))


class EvalTransform:
    """bytes or uint8 array -> 3xHxW tensor, no randomness (evaluation, embedding).

    float32 in [-1, 1], or uint8 with ``normalize=False`` (then ``normalize`` it after the copy to the
    device)."""

    def __init__(self, image_size: int = 112, normalize: bool = True, decoder: str | None = None):
        self.image_size = int(image_size)
        self.normalize = bool(normalize)
        self.decoder = decoder
        resolve_decoder(decoder)  # a bad name fails here, and a missing simplejpeg is logged once, before workers fork

    def __call__(self, data) -> torch.Tensor:
        x = to_chw_uint8(decode_image(data, self.image_size, decoder=self.decoder))
        return normalize(x) if self.normalize else x

    def __repr__(self) -> str:
        return f"EvalTransform(image_size={self.image_size}, normalize={self.normalize})"


class TrainTransform:
    """EvalTransform plus a random horizontal flip with probability 0.5.

    With ``seed=None`` the flip draws from torch's global RNG, which DataLoader seeds differently
    in every worker, so runs are reproducible through ``torch.manual_seed``. With an integer seed
    the transform owns a generator seeded from (seed, worker id), created lazily in each process
    so forked workers do not share one stream. One draw per image, after decoding it, whatever
    ``normalize`` is, so uint8 and float outputs are the same images. uint8 comes out in the
    decoder's pixel order (``chw_view``); float32 contiguous, as before.
    """

    def __init__(self, image_size: int = 112, flip: bool = True, seed: int | None = None, normalize: bool = True,
                 decoder: str | None = None):
        self.image_size = int(image_size)
        self.flip = bool(flip)
        self.seed = seed
        self.normalize = bool(normalize)
        self.decoder = decoder
        resolve_decoder(decoder)  # a bad name fails here, and a missing simplejpeg is logged once, before workers fork
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
        img = decode_image(data, self.image_size, decoder=self.decoder)
        flip = self.should_flip()
        return normalize(to_chw_uint8(img, flip=flip)) if self.normalize else chw_view(img, flip=flip)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_gen"] = None  # generators are re-created per process
        state["_gen_owner"] = None
        return state

    def __repr__(self) -> str:
        return (f"TrainTransform(image_size={self.image_size}, flip={self.flip}, seed={self.seed}, "
                f"normalize={self.normalize})")
