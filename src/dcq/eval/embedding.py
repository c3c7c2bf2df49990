"""Embeddings for evaluation: batched, no gradients, eval-mode BN, flip test.

Flip test (as insightface and the DCQ paper evaluate): the embedding of an image is
``f(x) + f(mirror(x))``, then L2-normalised, so the comparison does not depend on which way a
face happens to be mirrored. Outputs are float32 numpy arrays with unit-norm rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from dcq.errors import DcqError

__all__ = ["bin_scores", "embed_images", "encoder_image_size", "evaluate_bin", "raw_pixel_embeddings"]

_BYTES = (bytes, bytearray, memoryview)


def encoder_image_size(encoder: nn.Module, default: int | None = None) -> int | None:
    """The input size a backbone was built for (``encoder.image_size``), else ``default``."""
    size = getattr(encoder, "image_size", None)
    return int(size) if size is not None else default


def _batch_tensor(images, start: int, stop: int, image_size: int | None) -> torch.Tensor:
    """Images [start, stop) as a (B, 3, H, W) tensor: float in [-1, 1] as given, else uint8 in pixel order
    (``chw_view``; normalised by the caller after the copy to the device, which moves a quarter of the
    bytes and leaves the rearranging to the device)."""
    from dcq.data.transforms import chw_view, decode_image

    if isinstance(images, torch.Tensor):
        x = images[start:stop]
        if not x.is_floating_point():
            raise DcqError(f"image tensors must be float (B, 3, H, W) in [-1, 1], got dtype {x.dtype}")
        return x.float()
    if isinstance(images, np.ndarray) and images.dtype != object:
        if images.dtype != np.uint8:
            raise DcqError(f"image arrays must be uint8 (N, H, W, 3), got dtype {images.dtype}")
        chunk = images[start:stop]
        if image_size is not None and chunk.shape[1:3] != (image_size, image_size):
            chunk = np.stack([decode_image(img, image_size) for img in chunk])
        return chw_view(chunk)
    items = images[start:stop]
    decoded = [decode_image(item if not isinstance(item, memoryview) else bytes(item), image_size,
                            where=f"image {start + k}") for k, item in enumerate(items)]
    shapes = {d.shape for d in decoded}
    if len(shapes) > 1:
        raise DcqError(f"images {start}..{stop - 1} have different sizes {sorted(shapes)}; pass image_size to "
                       "resize them to the encoder's input size")
    return chw_view(np.stack(decoded))


def _check_images(images) -> int:
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise DcqError(f"image tensors must be (N, 3, H, W), got shape {tuple(images.shape)}")
    elif isinstance(images, np.ndarray) and images.dtype != object:
        if images.ndim != 4 or images.shape[3] != 3:
            raise DcqError(f"image arrays must be uint8 (N, H, W, 3), got shape {images.shape}")
    elif not isinstance(images, Sequence) and not isinstance(images, np.ndarray):
        raise DcqError(f"images must be a uint8 array, a float tensor or a list of encoded images, "
                       f"got {type(images).__name__}")
    n = len(images)
    if n == 0:
        raise DcqError("no images to embed")
    return n


def embed_images(encoder: nn.Module, images, batch_size: int = 256, flip: bool = True,
                 device: str | torch.device = "cpu", progress: bool = False,
                 image_size: int | None = None) -> np.ndarray:
    """(N, d) float32 L2-normalised embeddings of ``images``.

    ``images``: uint8 (N, H, W, 3) RGB array, float (N, 3, H, W) tensor already in [-1, 1], or a
    list of encoded images (JPEG/PNG bytes) or uint8 arrays. Arrays and encoded images are
    resized to ``image_size`` (default: the encoder's ``image_size``); tensors are used as given.
    Images are decoded one batch at a time, so a long list of bytes is never decoded at once.
    The encoder runs in eval mode under ``torch.no_grad()``; its previous mode is restored.
    """
    from dcq.data.transforms import normalize

    n = _check_images(images)
    if batch_size < 1:
        raise DcqError(f"batch size must be >= 1, got {batch_size}")
    size = image_size if image_size is not None else encoder_image_size(encoder)
    device = torch.device(device)
    encoder.to(device)
    was_training = encoder.training
    encoder.eval()
    out: np.ndarray | None = None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="embedding", unit="img", dynamic_ncols=True)
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                stop = min(n, start + batch_size)
                x = _batch_tensor(images, start, stop, size).to(device)
                if x.dtype == torch.uint8:
                    x = normalize(x)
                if flip:
                    both = encoder(torch.cat([x, torch.flip(x, dims=[3])])).float()
                    e = both[: x.shape[0]] + both[x.shape[0]:]
                else:
                    e = encoder(x).float()
                e = torch.nn.functional.normalize(e, dim=1)
                if out is None:
                    out = np.empty((n, e.shape[1]), dtype=np.float32)
                out[start:stop] = e.cpu().numpy()
                if bar is not None:
                    bar.update(stop - start)
    finally:
        encoder.train(was_training)
        if bar is not None:
            bar.close()
    if not np.all(np.isfinite(out)):
        raise DcqError("the encoder produced NaN/inf embeddings; the checkpoint's weights are not usable")
    return out


def bin_scores(encoder: nn.Module, bin_path, image_size: int | None = None, batch_size: int = 256,
               device: str | torch.device = "cpu", flip: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Cosine scores of the pairs of a verification ``.bin`` (flip-test embeddings) and its issame flags."""
    from dcq.data.verification_bin import read_bin
    from dcq.eval.verification import cosine_scores

    images, issame = read_bin(bin_path)
    if len(issame) == 0:
        raise DcqError(f"{bin_path}: holds no pairs")
    emb = embed_images(encoder, images, batch_size=batch_size, flip=flip, device=device, image_size=image_size)
    return cosine_scores(emb[0::2], emb[1::2]), np.asarray(issame)


def evaluate_bin(encoder: nn.Module, bin_path, image_size: int, batch_size: int = 256,
                 device: str | torch.device = "cpu", flip: bool = True, n_folds: int = 10) -> dict:
    """``verify_pairs`` of a verification ``.bin`` (flip-test embeddings); the ``dcq eval --json`` keys."""
    from dcq.eval.verification import verify_scores

    scores, issame = bin_scores(encoder, bin_path, image_size, batch_size, device, flip)
    return verify_scores(scores, issame, n_folds=n_folds)


def raw_pixel_embeddings(images, image_size: int | None = None) -> np.ndarray:
    """The no-learning baseline: pixels mapped to [-1, 1] as the network sees them, flattened,
    L2-normalised (float32). Cosine of two such vectors is plain pixel correlation."""
    from dcq.data.transforms import decode_image

    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        arr = images
        if image_size is not None and arr.shape[1:3] != (image_size, image_size):
            arr = np.stack([decode_image(img, image_size) for img in arr])
    else:
        if len(images) == 0:
            raise DcqError("no images to embed")
        arr = np.stack([decode_image(img, image_size) for img in images])
    if arr.ndim != 4 or len(arr) == 0:
        raise DcqError(f"expected (N, H, W, 3) images, got shape {arr.shape}")
    flat = arr.reshape(len(arr), -1).astype(np.float32)
    flat = (flat - 127.5) / 127.5
    norm = np.linalg.norm(flat, axis=1, keepdims=True)
    return (flat / np.maximum(norm, 1e-12)).astype(np.float32)
