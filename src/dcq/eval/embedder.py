"""A model to evaluate, whether a dcq checkpoint or an ONNX file: one ``embed(images)`` for both.

The benchmark protocols (IJB, MegaFace) only need "aligned uint8 faces in, unit embeddings out";
this module gives them that for a ``.pt`` checkpoint (its evaluation encoder through PyTorch, as in
`dcq.eval.embedding`) and for an ``.onnx`` graph (dcq's own export or an insightface model-zoo
model, run by onnxruntime through `dcq.deploy.onnx_model.OnnxEmbedder`, which reads the model's
preprocessing from its metadata), so both are scored by the same code and give the same numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dcq.errors import DcqError

__all__ = ["is_onnx", "open_model"]


def is_onnx(path) -> bool:
    return str(path).lower().endswith(".onnx")


class CheckpointModel:
    """The evaluation encoder of a checkpoint (weight generator when there is one), flip-tested."""

    kind = "checkpoint"

    def __init__(self, path, device="cpu", batch_size: int = 256, flip: bool = True):
        from dcq.eval.pipeline import load_encoder

        self.encoder, self.info, self.checkpoint = load_encoder(path, device)
        self.device, self.batch_size, self.flip = device, int(batch_size), bool(flip)
        self.image_size = int(self.info["image_size"])
        self.embedding_size = int(self.info["embedding_size"])

    @classmethod
    def from_loaded(cls, encoder, info: dict, device="cpu", batch_size: int = 256, flip: bool = True):
        """The same for an encoder already loaded (`dcq.eval.pipeline.load_encoder`)."""
        self = cls.__new__(cls)
        self.encoder, self.info, self.checkpoint = encoder, info, None
        self.device, self.batch_size, self.flip = device, int(batch_size), bool(flip)
        self.image_size = int(info["image_size"])
        self.embedding_size = int(info["embedding_size"])
        return self

    def embed(self, images: np.ndarray) -> np.ndarray:
        """(N, d) float32 unit rows of uint8 (N, S, S, 3) RGB faces."""
        from dcq.eval.embedding import embed_images

        return embed_images(self.encoder, images, batch_size=self.batch_size, flip=self.flip, device=self.device,
                            image_size=self.image_size)


class OnnxModel:
    """An ONNX face model run by onnxruntime (CPU), flip-tested like a checkpoint."""

    kind = "onnx"

    def __init__(self, path, flip: bool = True):
        try:
            from dcq.deploy.onnx_model import OnnxEmbedder
        except ImportError as exc:
            raise DcqError(f"{path}: evaluating an ONNX model needs dcq.deploy.onnx_model, which this install "
                           f"lacks ({exc}); evaluate the .pt checkpoint instead") from None
        self.runner = OnnxEmbedder(str(path))
        self.flip = bool(flip)
        self.image_size = int(self.runner.image_size)
        self.embedding_size = int(self.runner.embedding_size)
        self.info = {"which": "onnx", "path": str(path), "image_size": self.image_size,
                     "embedding_size": self.embedding_size}

    def embed(self, images: np.ndarray) -> np.ndarray:
        out = np.asarray(self.runner.embed(images, flip=self.flip), dtype=np.float32)
        if not np.all(np.isfinite(out)):
            raise DcqError(f"{self.info['path']}: the ONNX model produced NaN/inf embeddings")
        return out


def open_model(path, device="cpu", batch_size: int = 256, flip: bool = True):
    """A `CheckpointModel` for a dcq checkpoint, an `OnnxModel` for a path ending in ``.onnx``."""
    if not Path(path).is_file():
        raise DcqError(f"{path}: model file not found; give a checkpoint .pt from `dcq train` or an .onnx")
    if is_onnx(path):
        return OnnxModel(path, flip=flip)
    return CheckpointModel(path, device=device, batch_size=batch_size, flip=flip)


def describe(model) -> str:
    """One line naming what is evaluated (printed by `dcq eval`)."""
    if model.kind == "onnx":
        return (f"model: ONNX {model.info['path']} on onnxruntime; {model.embedding_size}-d, "
                f"{model.image_size} px")
    from dcq.eval.cli import encoder_description

    return encoder_description(model.info)
