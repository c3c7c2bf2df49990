"""FullFC: the classic margin-softmax classifier with one learned weight per identity.

The baseline DCQ replaces: memory and compute grow linearly with the number of identities N
(weights, gradients and optimiser state are all N x d). With `distributed=True` (under torchrun)
the N centres are sharded over the ranks, N/W x d each, and the softmax is computed across ranks
(see `dcq.heads.sharding`); the loss and the training are the same as one process on the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dcq import distributed
from dcq.autocast import active_dtype
from dcq.heads.base import Head, HeadOutput, check_labels
from dcq.heads.sharding import ClassShard, add_state_dict_sharding, init_centres, sharded_cross_entropy
from dcq.heads.margins import make_margin


def margin_softmax(head_margin, embeddings: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   sharded: bool = False):
    """Cosine logits of normalised embeddings against normalised weights, margin on the targets.

    `sharded`: `weight` holds this rank's share of the columns and `targets` is -1 for rows whose
    positive lives on another rank; the softmax is then completed across ranks.

    Under autocast (bf16/fp16) the (B, N) product, the one large matmul, runs in the autocast dtype
    as insightface's arcface_torch runs it; the cosines are then taken back to float32, clamped to
    [-1, 1], and the margin and the softmax are computed in float32. Without autocast everything is
    float32.
    """
    device_type = embeddings.device.type
    amp_dtype = active_dtype(device_type)
    with torch.autocast(device_type=device_type, enabled=False):
        # Dividing the (B, N) product by the row norms is the same as normalising the (N, d) weight
        # first, but its backward touches N norms instead of N x d elementwise normalisation terms.
        weight = weight.float()
        inv_norm = weight.norm(dim=1).clamp_min(1e-12).reciprocal()
        unit = F.normalize(embeddings.float(), dim=1)
        if amp_dtype is None:
            cos = (unit @ weight.t()) * inv_norm
        else:
            cos = ((unit.to(amp_dtype) @ weight.to(amp_dtype).t()).float() * inv_norm).clamp(-1.0, 1.0)
        logits = head_margin.apply(cos, targets)
        if not sharded:
            return HeadOutput(loss=F.cross_entropy(logits, targets), logits=logits, targets=targets)
        loss, hits = sharded_cross_entropy(logits, targets)
    return HeadOutput(loss=loss, logits=logits, targets=targets, hits=hits)


def gather_batch(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch for a sharded head: every rank's embeddings (with gradients) and labels.

    Every rank's loss is the mean over the global batch, while DistributedDataParallel averages the
    feature extractor's gradients over ranks; the gather's backward multiplies by the world size
    so that average is the single-process gradient.
    """
    return (distributed.all_gather_with_grad(embeddings, grad_scale=distributed.world_size()),
            distributed.all_gather_cat(labels))


class FullFC(Head):
    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        scale: float = 64.0,
        margin: float = 0.5,
        margin_type: str = "arcface",
        seed: int = 0,
        distributed: bool = False,
    ):
        super().__init__()
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)
        self.margin = make_margin(margin_type, scale, margin)
        self.shard = ClassShard.for_this_rank(self.num_classes, distributed)
        self.weight = nn.Parameter(init_centres(self.num_classes, self.embedding_size, self.shard.start,
                                                self.shard.stop, seed))
        add_state_dict_sharding(self, lambda name: name == "weight")

    def sharded_parameters(self) -> list[nn.Parameter]:
        return [self.weight] if self.shard.sharded else []

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, key: torch.Tensor | None = None):
        labels = check_labels(labels, embeddings.shape[0], self.num_classes).to(embeddings.device)
        if not self.shard.sharded:
            return margin_softmax(self.margin, embeddings, self.weight, labels)
        embeddings, labels = gather_batch(embeddings, labels)
        return margin_softmax(self.margin, embeddings, self.weight, self.shard.local_targets(labels), sharded=True)

    def extra_repr(self) -> str:
        shard = f", rows={self.shard.start}:{self.shard.stop}" if self.shard.sharded else ""
        return f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, margin={self.margin}{shard}"
