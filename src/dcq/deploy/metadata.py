"""The ONNX metadata dcq writes on export, and the fingerprint that ties embeddings to a model.

An ONNX file alone does not say how its input must be prepared: a model fed BGR pixels, the wrong
normalisation or the wrong size still returns embeddings, just bad ones. `dcq export` records the
preparation in the model's ``metadata_props`` under ``dcq.*`` keys, and `OnnxEmbedder` reads them
back. Models without them (insightface's model zoo) get insightface's convention.

The fingerprint is a hash of the graph (weights included) but not of the metadata, so that
embeddings from two models never end up in one gallery, while re-tagging a file changes nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from dcq.errors import DcqError

PREFIX = "dcq."
# insightface's convention, for models that carry no dcq metadata
DEFAULT_MEAN = (127.5, 127.5, 127.5)
DEFAULT_STD = (127.5, 127.5, 127.5)
DEFAULT_SIZE = 112


@dataclass(frozen=True)
class Preprocessing:
    """How aligned uint8 RGB crops become the model's input: resize to ``image_size``, reorder
    channels to ``color_order``, ``(x - mean) / std`` per channel, NCHW."""

    image_size: int = DEFAULT_SIZE
    mean: tuple[float, float, float] = DEFAULT_MEAN
    std: tuple[float, float, float] = DEFAULT_STD
    color_order: str = "RGB"


def export_metadata(*, image_size: int, embedding_size: int, encoder: str, backbone: str, version: str) -> dict:
    """The ``dcq.*`` metadata for a model exported by dcq (string values, as ONNX stores them)."""
    return {
        PREFIX + "format": "1",
        PREFIX + "version": version,
        PREFIX + "image_size": str(int(image_size)),
        PREFIX + "input_layout": "NCHW",
        PREFIX + "color_order": "RGB",
        PREFIX + "mean": ",".join(str(v) for v in DEFAULT_MEAN),
        PREFIX + "std": ",".join(str(v) for v in DEFAULT_STD),
        PREFIX + "embedding_size": str(int(embedding_size)),
        PREFIX + "encoder": encoder,
        PREFIX + "backbone": backbone,
        PREFIX + "output": "raw embeddings; L2-normalise before comparing",
        PREFIX + "flip_test": "true",
        PREFIX + "flip_test_note": "embed the crop and its mirror image, add the two raw embeddings, then "
                                   "L2-normalise (as the model was evaluated)",
    }


def _triple(meta: dict, key: str, where: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in meta[key].split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(v == v and abs(v) != float("inf") for v in values):
        raise DcqError(f"{where}: metadata {key}={meta[key]!r} is not three numbers 'r,g,b'; re-export the model")
    return values  # type: ignore[return-value]


def read_preprocessing(meta: dict, static_size: int | None, where: str) -> Preprocessing:
    """The preprocessing of a model from its metadata map; insightface's where dcq wrote none
    (RGB, (x - 127.5) / 127.5, the graph's static input size or 112 px)."""
    if PREFIX + "image_size" not in meta:
        return Preprocessing(image_size=static_size or DEFAULT_SIZE)
    try:
        size = int(meta[PREFIX + "image_size"])
    except ValueError:
        size = 0
    if size < 8:
        raise DcqError(f"{where}: metadata dcq.image_size={meta[PREFIX + 'image_size']!r} is not a pixel size")
    if static_size is not None and static_size != size:
        raise DcqError(f"{where}: metadata says {size} px but the graph's input is {static_size} px; re-export")
    order = meta.get(PREFIX + "color_order", "RGB").upper()
    if order not in ("RGB", "BGR"):
        raise DcqError(f"{where}: metadata dcq.color_order={order!r}; expected RGB or BGR")
    mean = _triple(meta, PREFIX + "mean", where) if PREFIX + "mean" in meta else DEFAULT_MEAN
    std = _triple(meta, PREFIX + "std", where) if PREFIX + "std" in meta else DEFAULT_STD
    if any(s == 0 for s in std):
        raise DcqError(f"{where}: metadata dcq.std has a zero; re-export the model")
    return Preprocessing(image_size=size, mean=mean, std=std, color_order=order)


def model_fingerprint(path) -> str:
    """sha256 of the ONNX graph (nodes and weights; not the metadata), 16 hex digits."""
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError and friends for a file that is not ONNX
        raise DcqError(f"{path}: not an ONNX model ({type(exc).__name__}); give a file from `dcq export`") from None
    return hashlib.sha256(model.graph.SerializeToString()).hexdigest()[:16]


def fingerprint_of(path) -> str:
    """The fingerprint of the model file at ``path`` (an ``.onnx``)."""
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise DcqError(f"--model {path}: give the .onnx the embeddings were made with (`dcq export` writes one)")
    if not path.is_file():
        raise DcqError(f"--model {path}: file not found")
    return model_fingerprint(path)
