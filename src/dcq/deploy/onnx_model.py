"""`OnnxEmbedder`: embeddings of aligned face crops with onnxruntime, no torch.

The same computation as `dcq embed CKPT` (and as insightface evaluates): pixels prepared as the
model's metadata says (`dcq.deploy.metadata`), the crop and its mirror image through the graph,
the two raw embeddings added, the sum L2-normalised. Works on dcq's exports and on insightface's
model-zoo ONNX files (NCHW input, one embedding output).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dcq.deploy.metadata import Preprocessing, check_external_data, model_fingerprint, read_preprocessing
from dcq.errors import DcqError


def _static(dim) -> int | None:
    return int(dim) if isinstance(dim, int) and dim > 0 else None


class OnnxEmbedder:
    """An ONNX face encoder. ``embed(uint8 (N, S, S, 3) RGB) -> (N, d) float32`` unit-norm rows."""

    def __init__(self, path, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise DcqError(f"{self.path}: ONNX model not found; make one with `dcq export CKPT --onnx {self.path}`")
        check_external_data(self.path)  # before onnxruntime reads a file that declares more than it holds
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), options,
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for an invalid file
            raise DcqError(f"{self.path}: onnxruntime cannot load it ({str(exc).splitlines()[0][:160]})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise DcqError(f"{self.path}: expected one (N, 3, H, W) image input, got "
                           f"{[(i.name, i.shape) for i in inputs]}")
        shape = inputs[0].shape
        if _static(shape[1]) not in (None, 3):
            raise DcqError(f"{self.path}: input {inputs[0].name} has shape {shape}; dcq feeds NCHW RGB images "
                           "(channels second)")
        h, w = _static(shape[2]), _static(shape[3])
        if h is not None and w is not None and h != w:
            raise DcqError(f"{self.path}: input is {h}x{w}; dcq embeds square aligned crops")
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self.fixed_batch = _static(shape[0])
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.preprocessing: Preprocessing = read_preprocessing(self.metadata, h, str(self.path))
        self.image_size = self.preprocessing.image_size
        out_dim = _static(outputs[0].shape[-1]) if len(outputs[0].shape) == 2 else None
        meta_dim = self.metadata.get("dcq.embedding_size")
        if out_dim is None and meta_dim is not None and meta_dim.isdigit():
            out_dim = int(meta_dim)
        if out_dim is None:  # a fully dynamic output: run one black image to see
            zeros = np.zeros((1, self.image_size, self.image_size, 3), dtype=np.uint8)
            out_dim = int(self._run(self._prepare(zeros)).shape[1])
        self.embedding_size = out_dim
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """sha256 of the graph and weights (`dcq.deploy.metadata.model_fingerprint`)."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.path)
        return self._fingerprint

    def _prepare(self, images: np.ndarray) -> np.ndarray:
        p = self.preprocessing
        x = images.astype(np.float32)
        if p.color_order == "BGR":
            x = x[..., ::-1]
        x = (x - np.asarray(p.mean, dtype=np.float32)) / np.asarray(p.std, dtype=np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def _run(self, x: np.ndarray) -> np.ndarray:
        if self.fixed_batch is None:
            out = self.session.run([self.output_name], {self.input_name: x})[0]
        else:  # a graph exported with a fixed batch: run in chunks, the last one padded
            b, parts = self.fixed_batch, []
            for start in range(0, len(x), b):
                chunk = x[start:start + b]
                pad = b - len(chunk)
                if pad:
                    chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], dtype=chunk.dtype)])
                parts.append(self.session.run([self.output_name], {self.input_name: chunk})[0][:b - pad])
            out = np.concatenate(parts)
        out = np.asarray(out, dtype=np.float32)
        if out.ndim != 2 or out.shape[0] != len(x):
            raise DcqError(f"{self.path}: the model returned shape {out.shape} for {len(x)} images; expected (N, d)")
        return out

    def embed(self, images, flip: bool = True, normalise: bool = True) -> np.ndarray:
        """(N, d) float32 L2-normalised embeddings of aligned crops ``images`` (uint8 (N, S, S, 3) RGB,
        S = ``image_size``). ``flip``: add the embedding of each mirrored crop before normalising;
        ``normalise=False``: the raw (flip-summed) features."""
        images = np.asarray(images)
        s = self.image_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (s, s, 3):
            raise DcqError(f"images: expected uint8 (N, {s}, {s}, 3) RGB aligned crops, got {images.dtype} "
                           f"{images.shape}; align photos with `dcq align` first")
        if len(images) == 0:
            raise DcqError("no images to embed")
        x = self._prepare(images)
        if flip:
            both = self._run(np.concatenate([x, x[..., ::-1]]))
            e = both[: len(x)].astype(np.float64) + both[len(x):]
        else:
            e = self._run(x).astype(np.float64)
        if not np.all(np.isfinite(e)):
            raise DcqError(f"{self.path}: the model produced NaN/inf embeddings; its weights are not usable")
        if normalise:
            e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        return e.astype(np.float32)
