"""Evaluate a model: the one pipeline behind `dcq eval`, the demo and the experiments.

model file (a checkpoint, whose evaluation encoder is the weight generator when it has one, as the
DCQ paper evaluates, else the feature extractor; or an ``.onnx`` model) -> `dcq.encoders` encoder ->
flip-test embeddings -> 10-fold verification of every ``.bin`` (plus its cosine scores, for ROC
curves) and, with a dataset folder, the long-tail report of its probe set. A checkpoint and an
ONNX export of it go through the same code and give the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dcq.encoders import FaceEncoder, load_encoder, open_encoder

__all__ = ["CheckpointEvaluation", "Evaluation", "evaluate_checkpoint", "evaluate_model", "load_encoder"]


@dataclass
class Evaluation:
    model: FaceEncoder  # what was evaluated (`dcq.encoders`)
    verification: dict[str, dict] = field(default_factory=dict)  # set name -> `verify_scores` metrics
    scores: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # name -> (scores, issame)
    gallery: Any = None  # `ProbeGallery` of the dataset, when one was given
    longtail: dict | None = None  # `longtail_report` of the dataset, when one was given

    @property
    def info(self) -> dict[str, Any]:  # which encoder, backbone, embedding_size, image_size
        return self.model.info

    @property
    def encoder(self):  # the PyTorch module of a checkpoint (None for an ONNX model)
        return getattr(self.model, "encoder", None)

    @property
    def checkpoint(self) -> dict[str, Any] | None:
        return getattr(self.model, "checkpoint", None)


CheckpointEvaluation = Evaluation  # the name the experiments and benchmarks use


def evaluate_model(model: FaceEncoder, bins=(), dataset=None, *, n_folds: int = 10,
                   progress: bool = False) -> Evaluation:
    """Verification of every file in `bins` (keyed by file stem) and, with `dataset`, its long-tail report."""
    from dcq.eval.embedding import bin_scores
    from dcq.eval.longtail import embed_probe_gallery, longtail_report
    from dcq.eval.verification import verify_scores

    result = Evaluation(model)
    for bin_path in bins:
        name = Path(bin_path).stem
        scores, issame = bin_scores(model, bin_path)
        result.scores[name] = (scores, issame)
        result.verification[name] = verify_scores(scores, issame, n_folds=n_folds)
    if dataset is not None:
        result.gallery = embed_probe_gallery(model, dataset, progress=progress)
        result.longtail = longtail_report(model, dataset, gallery=result.gallery)
    return result


def evaluate_checkpoint(checkpoint, bins=(), dataset=None, *, batch_size: int = 256, device="cpu",
                        flip: bool = True, n_folds: int = 10, progress: bool = False) -> Evaluation:
    """`evaluate_model` of a model file: a dcq checkpoint, or an ``.onnx`` model (CPU)."""
    model = open_encoder(checkpoint, device=device, batch_size=batch_size, flip=flip)
    return evaluate_model(model, bins, dataset, n_folds=n_folds, progress=progress)
