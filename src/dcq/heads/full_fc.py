"""FullFC: the classic margin-softmax classifier with one learned weight per identity.

The baseline DCQ replaces: memory and compute grow linearly with the number of identities N
(weights, gradients and optimiser state are all N x d).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dcq.heads.base import Head, HeadOutput, check_labels
from dcq.margins import make_margin


def margin_softmax(head_margin, embeddings: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    """Cosine logits of normalised embeddings against normalised weights, margin on the targets."""
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        # Dividing the (B, N) product by the row norms is the same as normalising the (N, d) weight
        # first, but its backward touches N norms instead of N x d elementwise normalisation terms.
        weight = weight.float()
        inv_norm = weight.norm(dim=1).clamp_min(1e-12).reciprocal()
        cos = (F.normalize(embeddings.float(), dim=1) @ weight.t()) * inv_norm
        logits = head_margin.apply(cos, targets)
        loss = F.cross_entropy(logits, targets)
    return HeadOutput(loss=loss, logits=logits, targets=targets)


class FullFC(Head):
    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        scale: float = 64.0,
        margin: float = 0.5,
        margin_type: str = "arcface",
    ):
        super().__init__()
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)
        self.margin = make_margin(margin_type, scale, margin)
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (self.num_classes, self.embedding_size)))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, key: torch.Tensor | None = None):
        labels = check_labels(labels, embeddings.shape[0], self.num_classes).to(embeddings.device)
        return margin_softmax(self.margin, embeddings, self.weight, labels)

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, margin={self.margin}"
