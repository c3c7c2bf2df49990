"""A face encoder, whether a dcq checkpoint or an ONNX file: one ``embed(images)`` for both.

Evaluation (`dcq eval`, the trainer's periodic check, the benchmarks) and deployment (`dcq embed`,
`dcq verify`) both start from "face images in, embeddings out"; this module gives them that, below
both, so a ``.pt`` checkpoint and an ``.onnx`` graph are scored by the same code:

- `CheckpointEncoder`: a checkpoint's *evaluation encoder* (the weight generator, the EMA copy, when
  the checkpoint has one, as the DCQ paper evaluates; else the feature extractor) run by PyTorch;
- `OnnxEncoder`: dcq's own export or an insightface model-zoo model, run by onnxruntime through
  `dcq.deploy.onnx_model.OnnxEmbedder` (which reads the preprocessing from the model's metadata).

Flip test (as insightface and the DCQ paper evaluate): the feature of an image is
``f(x) + f(mirror(x))``. ``embed(images)`` returns it L2-normalised (unit rows, what every cosine
comparison uses); ``embed(images, normalise=False)`` returns the raw sum, whose norm IJB template
pooling keeps (insightface's test mode N1, `dcq.eval.ijb`). Importing this module loads no torch.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from dcq.errors import DcqError

__all__ = ["CheckpointEncoder", "FaceEncoder", "OnnxEncoder", "add_model_options", "as_encoder",
           "describe_checkpoint_encoder", "embed_images", "encoder_image_size", "is_onnx", "load_encoder",
           "open_encoder", "torch_device"]

_BYTES = (bytes, bytearray, memoryview)


def is_onnx(path) -> bool:
    return str(path).lower().endswith(".onnx")


def encoder_image_size(encoder, default: int | None = None) -> int | None:
    """The input size a backbone was built for (``encoder.image_size``), else ``default``."""
    size = getattr(encoder, "image_size", None)
    return int(size) if size is not None else default


def load_encoder(checkpoint, device="cpu", prefer: str = "weight_generator") -> tuple[Any, dict, dict]:
    """(evaluation encoder on `device` in eval mode, its info, the checkpoint dict)."""
    from dcq.checkpoint import build_eval_encoder, load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    encoder, info = build_eval_encoder(ckpt, prefer=prefer)
    return encoder.to(device), info, ckpt


def describe_checkpoint_encoder(info: dict) -> str:
    if info.get("which") == "weight_generator":
        what = "weight generator (EMA) embeddings, as in the DCQ paper"
    else:
        what = "feature extractor embeddings (the checkpoint has no weight generator)"
    return f"encoder: {what}; {info.get('backbone')}, {info.get('embedding_size')}-d, {info.get('image_size')} px"


def add_model_options(parser, model_help: str = "checkpoint .pt written by `dcq train`") -> None:
    """The options every command that runs an encoder takes (`dcq eval`, `dcq embed`, `dcq verify`)."""
    parser.add_argument("checkpoint", metavar="CKPT", help=model_help)
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default cpu)")
    parser.add_argument("--no-flip", action="store_true", help="no flip test (embed only the image itself)")


def torch_device(name: str, batch_size: int = 1):
    """The torch device ``name`` (checked: CUDA must be present), after checking ``batch_size``."""
    import torch

    if batch_size < 1:
        raise DcqError(f"--batch-size must be >= 1, got {batch_size}")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise DcqError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DcqError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return dev


# --------------------------------------------------------------------------- PyTorch
def _batch_tensor(images, start: int, stop: int, image_size: int | None):
    """Images [start, stop) as a (B, 3, H, W) tensor: float in [-1, 1] as given, else uint8 in pixel order
    (``chw_view``; normalised by the caller after the copy to the device, which moves a quarter of the
    bytes and leaves the rearranging to the device)."""
    import torch

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
    return chw_view(_decoded(images, start, stop, image_size))


def _decoded(images, start: int, stop: int, image_size: int | None) -> np.ndarray:
    """uint8 (B, S, S, 3) RGB of a list of encoded images or arrays, items [start, stop)."""
    from dcq.data.transforms import decode_image

    decoded = [decode_image(item if not isinstance(item, memoryview) else bytes(item), image_size,
                            where=f"image {start + k}") for k, item in enumerate(images[start:stop])]
    shapes = {d.shape for d in decoded}
    if len(shapes) > 1:
        raise DcqError(f"images {start}..{stop - 1} have different sizes {sorted(shapes)}; pass image_size to "
                       "resize them to the encoder's input size")
    return np.stack(decoded)


def _check_images(images) -> int:
    torch = sys.modules.get("torch")  # a tensor can only come from a process that loaded torch
    if torch is not None and isinstance(images, torch.Tensor):
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


def embed_images(encoder, images, batch_size: int = 256, flip: bool = True, device="cpu", progress: bool = False,
                 image_size: int | None = None, normalise: bool = True) -> np.ndarray:
    """(N, d) float32 flip-test embeddings of ``images`` by a PyTorch ``encoder``, L2-normalised unless
    ``normalise=False``.

    ``images``: uint8 (N, H, W, 3) RGB array, float (N, 3, H, W) tensor already in [-1, 1], or a
    list of encoded images (JPEG/PNG bytes) or uint8 arrays. Arrays and encoded images are
    resized to ``image_size`` (default: the encoder's ``image_size``); tensors are used as given.
    Images are decoded one batch at a time, so a long list of bytes is never decoded at once.
    The encoder runs in eval mode under ``torch.no_grad()``; its previous mode is restored.
    """
    import torch

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
                if normalise:
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


# --------------------------------------------------------------------------- one interface
class FaceEncoder:
    """``embed(images, normalise=True) -> (N, d) float32``; ``image_size``, ``embedding_size``, ``flip``,
    ``kind`` ("checkpoint" or "onnx"), ``info`` and ``describe()``."""

    kind = ""
    image_size: int
    embedding_size: int | None
    flip: bool
    batch_size: int
    info: dict

    def embed(self, images, normalise: bool = True) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError


class CheckpointEncoder(FaceEncoder):
    """The evaluation encoder of a checkpoint (weight generator when there is one), flip-tested."""

    kind = "checkpoint"

    def __init__(self, path, device="cpu", batch_size: int = 256, flip: bool = True,
                 prefer: str = "weight_generator"):
        encoder, info, ckpt = load_encoder(path, device, prefer=prefer)
        self._set(encoder, info, ckpt, device, batch_size, flip)

    @classmethod
    def from_loaded(cls, encoder, info: dict | None = None, device="cpu", batch_size: int = 256,
                    flip: bool = True, image_size: int | None = None) -> CheckpointEncoder:
        """The same for a module already built (`load_encoder`, or a backbone being trained)."""
        self = cls.__new__(cls)
        info = dict(info or {})
        size = info.get("image_size") or image_size or encoder_image_size(encoder)
        info.setdefault("image_size", size)
        info.setdefault("embedding_size", getattr(encoder, "embedding_size", None))
        self._set(encoder, info, None, device, batch_size, flip)
        return self

    def _set(self, encoder, info, ckpt, device, batch_size, flip) -> None:
        self.encoder, self.info, self.checkpoint = encoder, info, ckpt
        self.device, self.batch_size, self.flip = device, int(batch_size), bool(flip)
        self.image_size = None if info.get("image_size") is None else int(info["image_size"])
        self.embedding_size = None if info.get("embedding_size") is None else int(info["embedding_size"])

    def embed(self, images, normalise: bool = True) -> np.ndarray:
        """(N, d) float32 flip-test embeddings (see `embed_images` for the kinds of ``images``)."""
        return embed_images(self.encoder, images, batch_size=self.batch_size, flip=self.flip, device=self.device,
                            image_size=self.image_size, normalise=normalise)

    def describe(self) -> str:
        return describe_checkpoint_encoder(self.info)


class OnnxEncoder(FaceEncoder):
    """An ONNX face model run by onnxruntime (CPU), flip-tested like a checkpoint."""

    kind = "onnx"

    def __init__(self, path, batch_size: int = 256, flip: bool = True, threads: int | None = None):
        try:
            from dcq.deploy.onnx_model import OnnxEmbedder
        except ImportError as exc:
            raise DcqError(f"{path}: running an ONNX model needs onnxruntime, which this install lacks ({exc}); "
                           "pip install onnxruntime, or use the .pt checkpoint") from None
        self.runner = OnnxEmbedder(str(path), threads=threads)
        self.batch_size, self.flip = int(batch_size), bool(flip)
        self.image_size = int(self.runner.image_size)
        self.embedding_size = int(self.runner.embedding_size)
        self.info = {"which": "onnx", "path": str(path), "image_size": self.image_size,
                     "embedding_size": self.embedding_size}

    @property
    def fingerprint(self) -> str:
        return self.runner.fingerprint

    def embed(self, images, normalise: bool = True) -> np.ndarray:
        """(N, d) float32 of uint8 (N, H, W, 3) RGB faces or a list of encoded images, ``batch_size`` at a
        time (resized to the model's input size)."""
        n = _check_images(images)
        s = self.image_size
        out = None
        for start in range(0, n, self.batch_size):
            stop = min(n, start + self.batch_size)
            if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.shape[1:3] == (s, s):
                faces = images[start:stop]
            else:
                faces = _decoded(images, start, stop, s)
            e = np.asarray(self.runner.embed(faces, flip=self.flip, normalise=normalise), dtype=np.float32)
            if out is None:
                out = np.empty((n, e.shape[1]), dtype=np.float32)
            out[start:stop] = e
        if not np.all(np.isfinite(out)):
            raise DcqError(f"{self.info['path']}: the ONNX model produced NaN/inf embeddings")
        return out

    def describe(self) -> str:
        return f"model: ONNX {self.info['path']} on onnxruntime; {self.embedding_size}-d, {self.image_size} px"


def open_encoder(path, device="cpu", batch_size: int = 256, flip: bool = True) -> FaceEncoder:
    """A `CheckpointEncoder` for a dcq checkpoint, an `OnnxEncoder` for a path ending in ``.onnx``."""
    if batch_size < 1:
        raise DcqError(f"--batch-size must be >= 1, got {batch_size}")
    if is_onnx(path):
        if str(device) != "cpu":
            raise DcqError(f"--device {device}: an .onnx model is evaluated on the CPU (onnxruntime); "
                           "use --device cpu or evaluate the .pt checkpoint")
        return OnnxEncoder(path, batch_size=batch_size, flip=flip)
    return CheckpointEncoder(path, device=device, batch_size=batch_size, flip=flip)


def as_encoder(model, device="cpu", batch_size: int = 256, flip: bool = True,
               image_size: int | None = None) -> FaceEncoder:
    """``model`` itself when it is a `FaceEncoder`, else a PyTorch module wrapped as one."""
    if isinstance(model, FaceEncoder):
        return model
    return CheckpointEncoder.from_loaded(model, None, device, batch_size, flip, image_size)
