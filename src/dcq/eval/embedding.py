"""Flip-test embeddings of a verification ``.bin`` and the no-learning pixel baseline.

The embeddings themselves come from `dcq.encoders` (a checkpoint's encoder or an ONNX model, one
``embed``): the flip-test feature ``f(x) + f(mirror(x))``, L2-normalised, as insightface's
``verification.py`` computes it for ``.bin`` sets (docs/evaluation.md, "What is normalised").
``embed_images`` and ``encoder_image_size`` are re-exported from there.
"""

from __future__ import annotations

import numpy as np

from dcq.encoders import as_encoder, embed_images, encoder_image_size
from dcq.errors import DcqError

__all__ = ["bin_scores", "embed_images", "encoder_image_size", "evaluate_bin", "raw_pixel_embeddings"]


def bin_scores(encoder, bin_path, image_size: int | None = None, batch_size: int = 256, device="cpu",
               flip: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Cosine scores of the pairs of a verification ``.bin`` (flip-test embeddings) and its issame flags.

    ``encoder``: a `dcq.encoders.FaceEncoder` (checkpoint or ONNX; its own batch size, flip and input
    size apply) or a PyTorch module (the other arguments apply)."""
    from dcq.data.verification_bin import read_bin
    from dcq.eval.verification import cosine_scores

    model = as_encoder(encoder, device, batch_size, flip, image_size)
    images, issame = read_bin(bin_path)
    if len(issame) == 0:
        raise DcqError(f"{bin_path}: holds no pairs")
    emb = model.embed(images)
    return cosine_scores(emb[0::2], emb[1::2]), np.asarray(issame)


def evaluate_bin(encoder, bin_path, image_size: int | None = None, batch_size: int = 256, device="cpu",
                 flip: bool = True, n_folds: int = 10) -> dict:
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
