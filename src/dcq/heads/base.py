"""What every head returns, and the one call signature the training loop relies on.

All heads are called as ``head(embeddings, labels=labels, key=key)``: classification heads ignore
`key`; DCQ needs it (the weight generator's embedding of the reference image). `needs_key` tells the
loop whether computing keys is worth the forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class HeadOutput:
    loss: torch.Tensor  # scalar mean cross-entropy
    logits: torch.Tensor  # (B, C) scaled logits, margin applied to the target column; -inf = masked
    targets: torch.Tensor  # (B,) column of each row's positive in `logits`

    @property
    def accuracy(self) -> float:
        """Share of rows whose positive column wins (the head's training accuracy)."""
        if self.logits.shape[0] == 0:
            return 0.0
        return (self.logits.argmax(dim=1) == self.targets).float().mean().item()


class Head(nn.Module):
    """Base class: a loss on (embeddings, labels[, key]) that returns a HeadOutput."""

    needs_key: bool = False

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Hook for heads that manage part of their optimiser state themselves (Partial FC)."""


def check_labels(labels: torch.Tensor, batch: int, num_classes: int | None = None) -> torch.Tensor:
    if labels.ndim != 1 or labels.shape[0] != batch:
        raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
    labels = labels.to(torch.long)
    if batch and int(labels.min()) < 0:
        raise ValueError("labels must be >= 0")
    if num_classes is not None and batch and int(labels.max()) >= num_classes:
        raise ValueError(f"label {int(labels.max())} out of range for a head with {num_classes} classes")
    return labels
