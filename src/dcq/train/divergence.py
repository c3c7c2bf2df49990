"""Stop a run that diverges, naming the step, before it writes a checkpoint.

A margin head's loss is bounded (cosine logits times the scale), so a run with far too high a
learning rate does not show NaN: its weights grow by orders of magnitude while the normalised
embeddings collapse. The monitor therefore watches three things after each step:

- the loss is finite (checked before the optimiser step, so bad gradients are never applied);
- the gradient norm (before clipping) is finite;
- the weight norm of the trained parameters stays within ``WEIGHT_GROWTH`` times its value at the
  start of this process (ordinary training with weight decay stays within a few times).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch

from dcq.errors import DcqError

WEIGHT_GROWTH = 100.0
ADVICE = "a lower lr (or grad_clip > 0)"


class TrainingDiverged(DcqError):
    """The loss, gradients or weights blew up; training stopped before the next checkpoint."""


def _norm(tensors: list[torch.Tensor]) -> float:
    if not tensors:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([t.detach().float().norm() for t in tensors])))


def grad_norm(params: Iterable[torch.Tensor]) -> float:
    return _norm([p.grad for p in params if p.grad is not None])


class DivergenceMonitor:
    def __init__(self, params: Iterable[torch.Tensor], out: Path, has_checkpoint):
        self.params = [p for p in params if p.requires_grad]
        self.out = out
        self.has_checkpoint = has_checkpoint  # () -> bool: is there a checkpoint to go back to?
        self.initial = _norm(self.params)

    def _fail(self, step: int, what: str) -> None:
        if self.has_checkpoint():
            then = (f"the checkpoints in {self.out} are untouched: continue from the last good one with --resume "
                    f"and {ADVICE}")
        else:
            then = f"no checkpoint was written yet: start again with {ADVICE}"
        raise TrainingDiverged(f"training diverged at step {step}: {what}; {then}")

    def check_loss(self, step: int, loss: float) -> None:
        if not math.isfinite(loss):
            self._fail(step, f"loss is {loss} (training stopped before the optimiser step)")

    def check_step(self, step: int, gradient_norm: float | None) -> None:
        if gradient_norm is not None and not math.isfinite(gradient_norm):
            self._fail(step, f"gradient norm is {gradient_norm}")
        weights = _norm(self.params)
        if not math.isfinite(weights) or weights > WEIGHT_GROWTH * max(self.initial, 1e-12):
            self._fail(step, f"weight norm {weights:.3g} is more than {WEIGHT_GROWTH:g}x its starting "
                             f"value {self.initial:.3g}")
