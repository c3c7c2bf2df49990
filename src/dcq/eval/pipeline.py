"""Evaluate a checkpoint: the one pipeline behind `dcq eval`, the demo and the experiments.

checkpoint file -> evaluation encoder (the weight generator when the checkpoint has one, as the DCQ
paper evaluates, else the feature extractor) -> flip-test embeddings -> 10-fold verification of
every ``.bin`` (plus its cosine scores, for ROC curves) and, with a dataset folder, the long-tail
report of its probe set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn


@dataclass
class CheckpointEvaluation:
    encoder: nn.Module
    info: dict[str, Any]  # which encoder, backbone, embedding_size, image_size
    checkpoint: dict[str, Any]
    verification: dict[str, dict] = field(default_factory=dict)  # set name -> `verify_scores` metrics
    scores: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # name -> (scores, issame)
    gallery: Any = None  # `ProbeGallery` of the dataset, when one was given
    longtail: dict | None = None  # `longtail_report` of the dataset, when one was given


def load_encoder(checkpoint, device="cpu", prefer: str = "weight_generator") -> tuple[nn.Module, dict, dict]:
    """(evaluation encoder on `device` in eval mode, its info, the checkpoint dict)."""
    from dcq.checkpoint import build_eval_encoder, load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    encoder, info = build_eval_encoder(ckpt, prefer=prefer)
    return encoder.to(device), info, ckpt


def evaluate_checkpoint(checkpoint, bins=(), dataset=None, *, batch_size: int = 256, device="cpu",
                        flip: bool = True, n_folds: int = 10, progress: bool = False) -> CheckpointEvaluation:
    """Verification of every file in `bins` (keyed by file stem) and, with `dataset`, its long-tail report."""
    from dcq.eval.embedding import bin_scores
    from dcq.eval.longtail import embed_probe_gallery, longtail_report
    from dcq.eval.verification import verify_scores

    encoder, info, ckpt = load_encoder(checkpoint, device)
    result = CheckpointEvaluation(encoder, info, ckpt)
    size = info["image_size"]
    for bin_path in bins:
        name = Path(bin_path).stem
        scores, issame = bin_scores(encoder, bin_path, size, batch_size, device, flip)
        result.scores[name] = (scores, issame)
        result.verification[name] = verify_scores(scores, issame, n_folds=n_folds)
    if dataset is not None:
        result.gallery = embed_probe_gallery(encoder, dataset, size, device=device, batch_size=batch_size,
                                             flip=flip, progress=progress)
        result.longtail = longtail_report(encoder, dataset, gallery=result.gallery)
    return result
