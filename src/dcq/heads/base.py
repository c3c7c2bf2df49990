"""What every head returns, and the one call the training step relies on.

Every head is called ``out = head(embeddings, labels, key=key)``:

- ``embeddings`` (B, d): the feature extractor's embeddings of the sample images (get gradients);
- ``labels`` (B,) int64: the identities;
- ``key`` (B, d) or (B, k, d): the weight generator's embeddings of the reference images (constant).
  DCQ needs it (``needs_key = True``, so the step computes it); FC and Partial FC ignore it.

and returns a `HeadOutput`. A head reports its own training metrics through ``metrics()`` (DCQ: how
full its queue is), so the training loop never asks which head it runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dcq.heads.sharding import ClassShard


@dataclass
class HeadOutput:
    loss: torch.Tensor  # scalar mean cross-entropy
    logits: torch.Tensor  # (B, C) scaled logits, margin applied to the target column; -inf = masked
    targets: torch.Tensor  # (B,) column of each row's positive in `logits`
    # Heads sharded over ranks: `logits` are this rank's columns for the global batch, `targets` is
    # -1 where a row's positive is on another rank, and `hits` says per row whether the positive won.
    hits: torch.Tensor | None = None

    @property
    def accuracy(self) -> float:
        """Share of rows whose positive column wins (the head's training accuracy); reads the device."""
        return float(self.accuracy_tensor().item())

    def accuracy_tensor(self) -> torch.Tensor:
        """The same as a 0-d float32 tensor on the logits' device: no host synchronisation."""
        if self.logits.shape[0] == 0:
            return torch.zeros((), device=self.logits.device)
        if self.hits is not None:
            return self.hits.float().mean()
        return (self.logits.argmax(dim=1) == self.targets).float().mean()


class Head(nn.Module):
    """Base class: a loss on (embeddings, labels, key) that returns a HeadOutput."""

    needs_key: bool = False  # True: the step computes the weight generator's key for every batch

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                key: torch.Tensor | None = None) -> HeadOutput:
        raise NotImplementedError

    def metrics(self) -> dict[str, float]:
        """Head-specific training metrics, logged beside the loss (name -> value)."""
        return {}

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Couple the head to the optimiser that steps its parameters. Call it once after building
        the optimiser; heads whose parameters are plain (DCQ, FC) need nothing, Partial FC hooks
        its gather/scatter of the sampled rows into that optimiser's steps."""

    shard: ClassShard | None = None  # heads with class centres sharded over ranks set this

    def sharded_parameters(self) -> list[nn.Parameter]:
        """Parameters holding only this rank's rows of the class centres (empty unless sharded).

        Their optimiser state is sharded the same way: `gather_rows` (a collective) turns such a
        tensor into the full N rows on rank 0's host for a checkpoint, `local_rows` takes this rank's rows back.
        """
        return []

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.shard.gather(tensor) if self.shard is not None else tensor

    def local_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.shard.take(tensor) if self.shard is not None else tensor


def check_labels(labels: torch.Tensor, batch: int, num_classes: int | None = None) -> torch.Tensor:
    """Shape always; values where they can be read without a device sync: labels on the host (the
    training step checks them there, before its copy to the device) are range-checked with numpy."""
    if labels.ndim != 1 or labels.shape[0] != batch:
        raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
    labels = labels.to(torch.long)
    if batch and labels.device.type == "cpu":
        values = labels.detach().numpy()
        if values.min() < 0:
            raise ValueError("labels must be >= 0")
        if num_classes is not None and values.max() >= num_classes:
            raise ValueError(f"label {int(values.max())} out of range for a head with {num_classes} classes")
    return labels
