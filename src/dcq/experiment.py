"""Train one configuration, then evaluate the model it wrote: the layer above training and evaluation.

Imports point down only:

    dcq.checkpoint, dcq.models, dcq.heads, dcq.data      model I/O, networks, losses, data
    dcq.eval                                               evaluation (never imports training)
    dcq.train                                              training (verifies with dcq.eval as it goes)
    dcq.experiment                                         train, then evaluate the checkpoint
    dcq.demo, benchmarks/claims.py                         orchestration and reports

Evaluation, export and the demo never import `dcq.train`; the demo reaches training only through
`train_and_evaluate`, and reads results through the same `evaluate_checkpoint` as `dcq eval`.
"""

from __future__ import annotations

from typing import Any

from dcq.eval.pipeline import CheckpointEvaluation, evaluate_checkpoint


def train_and_evaluate(settings: dict[str, Any], source: str = "experiment", bins=(), dataset=None,
                       batch_size: int = 256, overwrite: bool = False) -> tuple[dict[str, Any], CheckpointEvaluation]:
    """Train with config `settings` (TrainConfig keys), then evaluate its final checkpoint on `bins`
    (verification) and `dataset` (long-tail report). Returns (training summary, evaluation).
    `overwrite` replaces an earlier run in the output folder (otherwise such a folder is refused)."""
    from dcq.train.config import build_config
    from dcq.train.loop import train

    summary = train(build_config(settings, source=source), overwrite=overwrite)
    return summary, evaluate_checkpoint(summary["final"], bins, dataset, batch_size=batch_size)
