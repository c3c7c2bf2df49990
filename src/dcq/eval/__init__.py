"""Evaluation: 10-fold verification, TAR@FAR, MegaFace-style identification, long-tail buckets.

- ``verify_pairs``: the ``dcq eval --json`` metrics of embedding pairs (``verification``).
- ``embed_images`` / ``evaluate_bin``: flip-test embeddings and a verification ``.bin`` end to end.
- ``evaluate_model`` / ``evaluate_checkpoint``: a `dcq.encoders` model, or a model file (checkpoint or
  ``.onnx``), end to end: the one pipeline of `dcq eval` and the demo.
- ``identify``: rank-k against a gallery plus (up to millions of) distractors, in bounded memory.
- ``longtail_report``: rank-1 and TAR@FAR per bucket of training images per identity.
- ``streamed_tar_at_far``: TAR at FAR down to 1e-6 from all pairs of labelled embeddings, streamed.

Names load lazily, so ``import dcq.eval`` pulls in neither scikit-learn nor matplotlib.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dcq.lazy import lazy_attributes

_EXPORTS = {
    "verify_pairs": "dcq.eval.verification",
    "verify_scores": "dcq.eval.verification",
    "roc_curve_points": "dcq.eval.verification",
    "embed_images": "dcq.eval.embedding",
    "bin_scores": "dcq.eval.embedding",
    "evaluate_checkpoint": "dcq.eval.pipeline",
    "evaluate_model": "dcq.eval.pipeline",
    "load_encoder": "dcq.eval.pipeline",
    "evaluate_bin": "dcq.eval.embedding",
    "raw_pixel_embeddings": "dcq.eval.embedding",
    "identify": "dcq.eval.identification",
    "match_ranks": "dcq.eval.identification",
    "longtail_report": "dcq.eval.longtail",
    "longtail_metrics": "dcq.eval.longtail",
    "streamed_tar_at_far": "dcq.eval.lowfar",
    "pair_counts": "dcq.eval.lowfar",
}

__all__ = [
    "bin_scores",
    "embed_images",
    "evaluate_bin",
    "evaluate_checkpoint",
    "evaluate_model",
    "identify",
    "load_encoder",
    "longtail_metrics",
    "longtail_report",
    "match_ranks",
    "pair_counts",
    "raw_pixel_embeddings",
    "roc_curve_points",
    "streamed_tar_at_far",
    "verify_pairs",
    "verify_scores",
]

if TYPE_CHECKING:  # pragma: no cover
    from dcq.eval.embedding import bin_scores, embed_images, evaluate_bin, raw_pixel_embeddings
    from dcq.eval.identification import identify, match_ranks
    from dcq.eval.longtail import longtail_metrics, longtail_report
    from dcq.eval.lowfar import pair_counts, streamed_tar_at_far
    from dcq.eval.pipeline import evaluate_checkpoint, evaluate_model, load_encoder
    from dcq.eval.verification import roc_curve_points, verify_pairs, verify_scores


__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)
