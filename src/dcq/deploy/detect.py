"""Face detection with MTCNN's three stages in numpy around onnxruntime: boxes, five landmarks, scores.

1. **Proposals**: the photo is shrunk into a pyramid (the first level maps the smallest face looked
   for, ``min_face`` pixels, to P-Net's 12-pixel window; each next level is 0.709 times smaller,
   until the short side falls below 12). P-Net scores every 12x12 window at stride 2; windows above
   the first threshold become boxes, thinned per level by non-maximum suppression (NMS, IoU 0.5),
   then over all levels (IoU 0.7), moved by P-Net's box offsets and made square.
2. **Refinement**: each box is cut out (black outside the photo), resized to 24x24 and scored by
   R-Net; survivors are thinned (IoU 0.7), moved by R-Net's offsets and made square.
3. **Output**: 48x48 crops through O-Net, which gives the final score, offsets and the five
   landmarks (fractions of the crop box); boxes overlapping by more than 0.7 of the smaller one are
   merged into the best, and faces smaller than ``min_face`` dropped.

The stage thresholds are MTCNN's 0.6 and 0.7, then 0.95 for the final score rather than its 0.7:
real faces score >= 0.998 on the test photographs while a suit's collar ring scores 0.886
(docs/deploy.md).

Pixels are fed as (p - 127.5) / 128 in RGB order; crops are resized with an area filter when
shrinking and bilinearly when enlarging. Landmarks are returned in the convention of
`dcq.align` (pixel (i, j) has its centre at (i, j)), in the order left eye, right eye, nose tip,
left and right mouth corners (left = smaller x), ready for `align_face`. The networks are any
`Networks`: `OnnxNetworks` here, or `dcq.deploy.mtcnn_nets.TorchNetworks` (the torch modules) in
the tests and the benchmark, so the two paths share every other step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dcq.deploy.mtcnn_interface import Networks
from dcq.errors import DcqError

THRESHOLDS = (0.6, 0.7, 0.95)
PYRAMID_FACTOR = 0.709
MIN_FACE = 20
_WINDOW, _STRIDE = 12, 2
_BATCH = 256


@dataclass
class Face:
    """One detected face: ``box`` (x1, y1, x2, y2) edges in pixels, ``landmarks`` (5, 2), ``score``."""

    box: np.ndarray
    landmarks: np.ndarray
    score: float

    @property
    def size(self) -> float:
        """The side of the (roughly square) box in pixels."""
        return float(math.sqrt(max(self.box[2] - self.box[0], 0) * max(self.box[3] - self.box[1], 0)))


class OnnxNetworks(Networks):
    """P-Net, R-Net and O-Net as onnxruntime sessions (exported by `dcq.deploy.mtcnn_weights`)."""

    def __init__(self, files: dict[str, Path] | None = None, threads: int | None = None):
        import onnxruntime as ort

        from dcq.deploy.mtcnn_weights import cache_folder, detector_files

        files = detector_files() if files is None else files
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        self.sessions = {}
        for name, path in files.items():
            try:
                self.sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime's own exception types for a broken file
                raise DcqError(f"{path}: the detector's ONNX file cannot be loaded ({str(exc).splitlines()[0][:120]}); "
                               f"delete {cache_folder()} and run again to re-export it") from None

    def _run(self, name: str, x: np.ndarray) -> list[np.ndarray]:
        session = self.sessions[name]
        return session.run(None, {session.get_inputs()[0].name: x})


def _normalise(pixels: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) as MTCNN was trained: (p - 127.5) / 128."""
    x = (pixels.astype(np.float32) - 127.5) * np.float32(1 / 128)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    h, w = image.shape[:2]
    shrinking = width < w or height < h
    pil = Image.fromarray(image).resize((width, height), Image.Resampling.BOX if shrinking
                                        else Image.Resampling.BILINEAR)
    return np.asarray(pil)


def pyramid_scales(height: int, width: int, min_face: float, factor: float = PYRAMID_FACTOR) -> list[float]:
    """The scales at which P-Net's 12-pixel window sees faces of ``min_face`` pixels and larger."""
    scale = _WINDOW / float(min_face)
    side = min(height, width) * scale
    scales = []
    while side >= _WINDOW:
        scales.append(scale)
        scale *= factor
        side *= factor
    return scales


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Indices of the boxes kept by greedy non-maximum suppression, best score first: a box is dropped
    when its overlap with a kept one (intersection over union, or over the smaller box with
    ``mode='min'``) exceeds ``threshold``."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        if mode == "min":
            overlap = inter / np.maximum(np.minimum(areas[i], areas[rest]), 1e-12)
        else:
            overlap = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-12)
        order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=np.int64)


def regress(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Boxes moved by a net's offsets: each edge shifts by its offset times the box's width or height."""
    size = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, axis=1)
    return boxes + offsets * size


def square(boxes: np.ndarray) -> np.ndarray:
    """The square of side max(width, height) with the same centre as each box."""
    centre = np.stack([boxes[:, 0] + boxes[:, 2], boxes[:, 1] + boxes[:, 3]], axis=1) / 2
    half = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])[:, None] / 2
    return np.concatenate([centre - half, centre + half], axis=1)


def crop_boxes(image: np.ndarray, boxes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, size, size, 3) uint8 crops of the whole-pixel boxes nearest to ``boxes`` (black outside the
    photo), and those whole-pixel boxes (the frame the net's outputs refer to)."""
    h, w = image.shape[:2]
    whole = np.rint(boxes).astype(np.int64)
    whole[:, 2:] = np.maximum(whole[:, 2:], whole[:, :2] + 1)
    crops = np.zeros((len(boxes), size, size, 3), dtype=np.uint8)
    for k, (x1, y1, x2, y2) in enumerate(whole):
        patch = np.zeros((y2 - y1, x2 - x1, 3), dtype=np.uint8)
        sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
        if sx2 > sx1 and sy2 > sy1:
            patch[sy1 - y1:sy2 - y1, sx1 - x1:sx2 - x1] = image[sy1:sy2, sx1:sx2]
        crops[k] = _resize(patch, size, size)
    return crops, whole.astype(np.float64)


def _batched(net, crops: np.ndarray) -> list[np.ndarray]:
    outs = [net(_normalise(crops[i:i + _BATCH])) for i in range(0, len(crops), _BATCH)]
    return [np.concatenate([np.asarray(o[j]) for o in outs]) for j in range(len(outs[0]))]


class FaceDetector:
    """MTCNN: ``detect(uint8 H x W x 3 RGB) -> [Face]``, largest first.

    ``min_face``: the smallest face looked for, in pixels (the pyramid starts there, and faces whose
    box is smaller are dropped); ``threshold``: the final (O-Net) score a face must reach;
    ``networks``: `OnnxNetworks` by default."""

    def __init__(self, networks=None, min_face: float = MIN_FACE, threshold: float = THRESHOLDS[2],
                 threads: int | None = None):
        if not min_face >= 12:
            raise DcqError(f"--min-face {min_face}: give the smallest face side in pixels, 12 or more")
        if not 0.0 < threshold < 1.0:
            raise DcqError(f"--threshold {threshold}: give a face score between 0 and 1 (default {THRESHOLDS[2]})")
        self.networks = OnnxNetworks(threads=threads) if networks is None else networks
        self.min_face = float(min_face)
        self.thresholds = (THRESHOLDS[0], THRESHOLDS[1], float(threshold))

    def _proposals(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        found = []
        for scale in pyramid_scales(h, w, self.min_face):
            level = _resize(image, math.ceil(w * scale), math.ceil(h * scale))
            prob, offsets = self.networks.pnet(_normalise(level)[None])[:2]
            prob, offsets = np.asarray(prob)[0], np.asarray(offsets)[0]
            rows, cols = np.nonzero(prob >= self.thresholds[0])
            if rows.size == 0:
                continue
            edges = np.stack([cols, rows, cols, rows], axis=1) * _STRIDE + np.array([0, 0, _WINDOW, _WINDOW])
            boxes = edges / scale
            scores = prob[rows, cols]
            keep = nms(boxes, scores, 0.5)
            found.append(np.concatenate([boxes[keep], scores[keep, None], offsets[:, rows[keep], cols[keep]].T], 1))
        if not found:
            return np.zeros((0, 4))
        found = np.concatenate(found)
        found = found[nms(found[:, :4], found[:, 4], 0.7)]
        return square(regress(found[:, :4], found[:, 5:9]))

    def detect(self, image: np.ndarray) -> list[Face]:
        """Every face in ``image`` (uint8 H x W x 3 RGB), the largest first."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise DcqError(f"detect: expected an H x W x 3 uint8 RGB image, got {image.dtype} {image.shape}")
        boxes = self._proposals(image)
        if len(boxes):
            crops, boxes = crop_boxes(image, boxes, 24)
            prob, offsets = _batched(self.networks.rnet, crops)[:2]
            keep = prob >= self.thresholds[1]
            boxes, prob, offsets = boxes[keep], prob[keep], offsets[keep]
            keep = nms(boxes, prob, 0.7)
            boxes = square(regress(boxes[keep], offsets[keep]))
        if len(boxes) == 0:
            return []
        crops, boxes = crop_boxes(image, boxes, 48)
        prob, offsets, marks = _batched(self.networks.onet, crops)[:3]
        keep = prob >= self.thresholds[2]
        boxes, prob, offsets, marks = boxes[keep], prob[keep], offsets[keep], marks[keep]
        size = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1)
        # Fractions of the crop box -> pixel edges -> pixel centres (dcq.align's convention).
        points = np.stack([marks[:, :5], marks[:, 5:10]], axis=2) * size[:, None, :] + boxes[:, None, :2] - 0.5
        boxes = regress(boxes, offsets)
        keep = nms(boxes, prob, 0.7, mode="min")
        faces = [Face(boxes[i].astype(np.float64), points[i].astype(np.float64), float(prob[i])) for i in keep]
        return sorted((f for f in faces if f.size >= self.min_face), key=lambda f: -f.size)
