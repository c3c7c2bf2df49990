"""Stop a run that diverges, naming the step, before it writes a checkpoint.

A margin head's loss is bounded (cosine logits times the scale), so a run with far too high a
learning rate does not show NaN: its weights grow by orders of magnitude while the normalised
embeddings collapse. The monitor therefore watches three things after each step:

- the loss is finite (checked before the optimiser step, so bad gradients are never applied);
- the gradient norm (before clipping) is finite;
- the weight norm of the trained parameters stays within ``WEIGHT_GROWTH`` times its value at the
  start of this process (ordinary training with weight decay stays within a few times).

All three are read back with the step's one host synchronisation, before the optimiser step (the
weight norm then is the earlier steps' result); the weights are read once more before each checkpoint.
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


def total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Total 2-norm of `tensors` as a 0-d tensor on their device (no host synchronisation)."""
    if not tensors:
        return torch.zeros(())  # off-device: no parameters, no device
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm([t.detach().float() for t in tensors])))


class DivergenceMonitor:
    def __init__(self, params: Iterable[torch.Tensor], out: Path, has_checkpoint):
        self.params = [p for p in params if p.requires_grad]
        self.out = out
        self.has_checkpoint = has_checkpoint  # () -> bool: is there a checkpoint to go back to?
        self.initial = float(total_norm(self.params))

    def _fail(self, step: int, what: str) -> None:
        if self.has_checkpoint():
            then = (f"the checkpoints in {self.out} are untouched: continue from the last good one with --resume "
                    f"and {ADVICE}")
        else:
            then = f"no checkpoint was written yet: start again with {ADVICE}"
        raise TrainingDiverged(f"training diverged at step {step}: {what}; {then}")

    def weight_norm(self) -> torch.Tensor:
        """The trained weights' norm as a device tensor, for the trainer to read with the step's statistics."""
        return total_norm(self.params)

    def check_loss(self, step: int, loss: float) -> None:
        if not math.isfinite(loss):
            self._fail(step, f"loss is {loss} (training stopped before the optimiser step)")

    def check_step(self, step: int, gradient_norm: float | None, weight_norm: float) -> None:
        """`weight_norm`: read before this step's update, so it judges the steps before it."""
        if gradient_norm is not None and not math.isfinite(gradient_norm):
            self._fail(step, f"gradient norm is {gradient_norm} (training stopped before the optimiser step)")
        self._check_weight_norm(step, weight_norm)

    def check_weights(self, step: int) -> None:
        """The weights as they are now (one host read: before a checkpoint, not every step)."""
        self._check_weight_norm(step, float(self.weight_norm()))

    def _check_weight_norm(self, step: int, weights: float) -> None:
        if not math.isfinite(weights) or weights > WEIGHT_GROWTH * max(self.initial, 1e-12):
            self._fail(step, f"weight norm {weights:.3g} is more than {WEIGHT_GROWTH:g}x its starting "
                             f"value {self.initial:.3g}")
