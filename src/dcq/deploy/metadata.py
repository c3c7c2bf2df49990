"""The ONNX metadata dcq writes on export, and the fingerprint that ties embeddings to a model.

An ONNX file alone does not say how its input must be prepared: a model fed BGR pixels, the wrong
normalisation or the wrong size still returns embeddings, just bad ones. `dcq export` records the
preparation in the model's ``metadata_props`` under ``dcq.*`` keys, and `OnnxEmbedder` reads them
back. Models without them (insightface's model zoo) get insightface's convention.

The fingerprint is a hash of the graph (weights included) but not of the metadata, so that
embeddings from two models never end up in one gallery, while re-tagging a file changes nothing;
the preprocessing the metadata asks for is recorded next to it (`preprocessing_record`) wherever
embeddings are kept. It is computed from the file's bytes as they are (the graph field, then the
bytes of every external-data tensor), streamed, never re-serialised, so a model over protobuf's
2 GB limit is fingerprinted too; the external data is checked against the tensors' shapes first
(`check_external_data`), so a file that declares more bytes than it holds is refused with one line
before onnxruntime reads it.
"""

from __future__ import annotations

import hashlib
import math
import os
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


def preprocessing_record(p: Preprocessing) -> dict:
    """What besides the graph decides an embedding: colour order, mean and std (JSON-able)."""
    return {"color_order": p.color_order, "mean": [float(v) for v in p.mean], "std": [float(v) for v in p.std]}


_GRAPH_FIELD = 7  # ModelProto.graph
_PACKED_BITS = {"INT4": 4, "UINT4": 4, "FLOAT4E2M1": 4, "INT2": 2, "UINT2": 2}


def _varint(f) -> int | None:
    value, shift = 0, 0
    while True:
        b = f.read(1)
        if not b:
            if shift:
                raise ValueError("truncated varint")
            return None
        value |= (b[0] & 0x7F) << shift
        shift += 7
        if not b[0] & 0x80:
            return value
        if shift > 63:
            raise ValueError("varint too long")


def _hash_graph_field(path: Path, h) -> None:
    """Feed ``h`` the raw bytes of the ModelProto's graph field(s), read from the file in blocks."""
    size = path.stat().st_size
    found = False
    with open(path, "rb") as f:
        while (tag := _varint(f)) is not None:
            field, wire = tag >> 3, tag & 7
            if wire == 0:
                if _varint(f) is None:
                    raise ValueError("truncated")
            elif wire in (1, 5):
                f.seek(8 if wire == 1 else 4, os.SEEK_CUR)
            elif wire == 2:
                length = _varint(f)
                if length is None or f.tell() + length > size:
                    raise ValueError("a field runs past the end of the file")
                if field != _GRAPH_FIELD:
                    f.seek(length, os.SEEK_CUR)
                    continue
                found = True
                while length:
                    block = f.read(min(length, 1 << 22))
                    h.update(block)
                    length -= len(block)
            else:
                raise ValueError(f"wire type {wire}")
            if f.tell() > size:
                raise ValueError("a field runs past the end of the file")
    if not found:
        raise ValueError("no graph")


def _tensors(graph):
    """Every TensorProto of a graph: initializers, sparse initializers, node attributes, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for g in attr.graphs:
                yield from _tensors(g)


def _tensor_bytes(tensor) -> int | None:
    """Bytes the tensor's shape and type need (None for a type of no fixed size)."""
    from onnx import TensorProto, helper

    count = math.prod(int(d) for d in tensor.dims)
    name = TensorProto.DataType.Name(tensor.data_type) if tensor.data_type in TensorProto.DataType.values() else ""
    if name in _PACKED_BITS:
        return -(-count * _PACKED_BITS[name] // 8)
    try:
        return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None


def check_external_data(path) -> list[tuple[str, Path, int, int]]:
    """(tensor, file, offset, length) of every external-data tensor of the ONNX model at ``path``,
    each checked: a file inside the model's folder whose bytes cover what the tensor's shape needs.
    One `DcqError` line otherwise (also for a file that is not ONNX). Reads no tensor data."""
    import onnx
    from onnx import TensorProto

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends for a file that is not ONNX
        raise DcqError(f"{path}: not an ONNX model ({type(exc).__name__}); give a file from `dcq export`") from None
    root = path.resolve().parent
    found = []
    for tensor in _tensors(model.graph):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        where = f"{path}: tensor {tensor.name[:80]!r}"
        location = info.get("location", "")
        target = (root / location).resolve()
        if not location or Path(location).is_absolute() or target.parent != root and root not in target.parents:
            raise DcqError(f"{where} keeps its data in {location[:120]!r}, outside the model's folder; refused")
        try:
            offset, length = int(info.get("offset", 0)), info.get("length")
            length = None if length is None else int(length)
        except ValueError:
            raise DcqError(f"{where}: its external-data offset/length are not numbers") from None
        need = _tensor_bytes(tensor)
        if length is None:
            length = need
        if length is None or offset < 0 or length < 0 or (need is not None and length != need):
            raise DcqError(f"{where} has shape {list(tensor.dims)[:8]} ({need} bytes) but declares {length} bytes "
                           "of external data; the model file is damaged: export it again")
        have = target.stat().st_size if target.is_file() else -1
        if have < 0 or offset + length > have:
            raise DcqError(f"{where} needs bytes {offset}..{offset + length} of {location[:120]}, which holds "
                           f"{max(have, 0)} bytes{'' if have >= 0 else ' (missing)'}; copy the model's data files "
                           "along with it")
        found.append((tensor.name, target, offset, length))
    return found


def model_fingerprint(path) -> str:
    """sha256 of the ONNX graph (nodes and weights; not the metadata), 16 hex digits: the graph
    field's bytes as stored, then each external-data tensor's bytes; streamed in blocks."""
    path = Path(path)
    external = check_external_data(path)
    h = hashlib.sha256()
    try:
        _hash_graph_field(path, h)
    except (ValueError, OSError) as exc:
        raise DcqError(f"{path}: not an ONNX model ({exc}); give a file from `dcq export`") from None
    for name, target, offset, length in external:
        h.update(f"external:{name}:{length}:".encode())
        with open(target, "rb") as f:
            f.seek(offset)
            while length:
                block = f.read(min(length, 1 << 22))
                if not block:
                    raise DcqError(f"{target}: shorter than the model says; copy the model's data files again")
                h.update(block)
                length -= len(block)
    return h.hexdigest()[:16]


def fingerprint_of(path) -> str:
    """The fingerprint of the model file at ``path`` (an ``.onnx``)."""
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise DcqError(f"--model {path}: give the .onnx the embeddings were made with (`dcq export` writes one)")
    if not path.is_file():
        raise DcqError(f"--model {path}: file not found")
    return model_fingerprint(path)


def preprocessing_of(path) -> dict:
    """`preprocessing_record` of the model file at ``path``, from its metadata (no onnxruntime)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends for a file that is not ONNX
        raise DcqError(f"{path}: not an ONNX model ({type(exc).__name__}); give a file from `dcq export`") from None
    meta = {p.key: p.value for p in model.metadata_props}
    return preprocessing_record(read_preprocessing(meta, None, str(path)))
