"""DynamicClassQueue: the DCQ head (Li et al., CVPR 2021).

Per batch of B items (a sample image and a reference image of one identity each), called as
``head(embeddings, labels, key=key)`` like every head:

1. q = normalise(embeddings) - the feature extractor's embedding of the sample (gets gradients)
   w = normalise(key)        - the weight generator's embedding of the reference: the identity's
                               class weight, generated on the fly (constant: no gradient)
2. positive logit   s * (cos(q, w) - m)               (CosFace; ArcFace etc. via `margin_type`)
   negative logits  s * cos(q, queue[j]) for every queue slot j, set to -inf where the slot is empty
                    or holds the sample's own identity
3. loss = cross-entropy with the positive as the target (column 0)
4. enqueue (w, label) into the FIFO class queue, after the logits are computed: in place, once the
   backward has consumed the logits (a hook on q), or at once when no gradient is being taken, so
   the queue is never copied (a 1M-entry queue is 2 GB).

Nothing here depends on the number of identities: cost is O(B * (1 + Q + B) * d).

Extensions, off by default in this class (the official implementation's behaviour); `dcq train`'s
recipe turns the first on and uses k = 2 references (docs/method.md):
- `in_batch_negatives`: the other items' generated weights in this batch are extra negatives
  (identities equal to the sample's are masked), appended after the queue columns. Under torchrun
  they are the weights of every rank's items (the global batch), as in one process.
- `dedup`: only the newest queue entry of an identity acts as a negative.
- k references per sample: pass key of shape (B, k, d); the k normalised keys are averaged and
  renormalised into one class weight (few-shot prototype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dcq.distributed import all_gather_cat
from dcq.heads.base import Head, HeadOutput, check_labels
from dcq.heads.margins import make_margin
from dcq.heads.queue import ClassQueue


class DynamicClassQueue(Head):
    needs_key = True

    def __init__(
        self,
        embedding_size: int = 512,
        queue_size: int = 8192,
        scale: float = 50.0,
        margin: float = 0.3,
        margin_type: str = "cosface",
        in_batch_negatives: bool = False,
        dedup: bool = False,
        distributed: bool = False,
    ):
        super().__init__()
        self.embedding_size = int(embedding_size)
        self.margin = make_margin(margin_type, scale, margin)
        self.in_batch_negatives = bool(in_batch_negatives)
        self.dedup = bool(dedup)
        self.queue = ClassQueue(queue_size, embedding_size)
        # distributed (under torchrun): every rank enqueues the weights generated on all ranks, so
        # the queues stay identical; FC and Partial FC take the same flag to shard their centres.
        self.distributed = bool(distributed)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # enqueued after the backward

    def class_weights(self, key: torch.Tensor) -> torch.Tensor:
        """Generated class weight per item: normalised key, or the renormalised mean of k keys."""
        key = key.detach().float()
        if key.ndim == 3:
            key = F.normalize(key, dim=-1).mean(dim=1)
        return F.normalize(key, dim=-1)

    def negative_mask(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, Q) True where a queue slot may act as a negative for the row's sample."""
        qlabels = self.queue.labels
        usable = qlabels >= 0
        if self.dedup:
            usable = usable & self._newest_slot_of_each_label()
        return usable.unsqueeze(0) & (qlabels.unsqueeze(0) != labels.unsqueeze(1))

    def _newest_slot_of_each_label(self) -> torch.Tensor:
        qlabels = self.queue.labels
        size = self.queue.size
        age = (self.queue.ptr - 1 - torch.arange(size, device=qlabels.device)) % size  # 0 = newest
        # Sort by (label, age): the first slot of each label run is that identity's newest entry.
        order = torch.argsort(qlabels * size + age)
        sorted_labels = qlabels[order]
        first = torch.ones_like(sorted_labels, dtype=torch.bool)
        first[1:] = sorted_labels[1:] != sorted_labels[:-1]
        newest = torch.zeros_like(first)
        newest[order] = first
        return newest

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                key: torch.Tensor | None = None) -> HeadOutput:
        if key is None:
            raise ValueError("DynamicClassQueue needs key=: the weight generator's embeddings of the reference "
                             "images, (B, d) or (B, k, d); call head(embeddings, labels, key=key)")
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must be (B, {self.embedding_size}), got {tuple(embeddings.shape)}")
        if key.shape[0] != embeddings.shape[0] or key.shape[-1] != self.embedding_size or key.ndim not in (2, 3):
            raise ValueError(f"key must be (B, d) or (B, k, d) matching embeddings, got {tuple(key.shape)}")
        labels = check_labels(labels, embeddings.shape[0]).to(embeddings.device)
        self.flush()  # a batch whose backward never ran (a stopped step, a discarded graph)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            q = F.normalize(embeddings.float(), dim=1)
            w = self.class_weights(key)

            positive = self.margin.target_logit((q * w).sum(dim=1)) * self.margin.scale
            negatives = q @ self.queue.weights.t() * self.margin.scale
            negatives = negatives.masked_fill(~self.negative_mask(labels), float("-inf"))
            # every rank's generated weights of this step: in-batch negatives over the global batch
            # (so N ranks train like one process with N times the batch), then the queue
            w_all, labels_all = (all_gather_cat(w), all_gather_cat(labels)) if self.distributed else (w, labels)
            columns = [positive.unsqueeze(1), negatives]
            if self.in_batch_negatives:
                in_batch = (q @ w_all.t()) * self.margin.scale
                in_batch = in_batch.masked_fill(labels.unsqueeze(1) == labels_all.unsqueeze(0), float("-inf"))
                columns.append(in_batch)
            logits = torch.cat(columns, dim=1)
            targets = torch.zeros_like(labels)
            loss = F.cross_entropy(logits, targets)

        if torch.is_grad_enabled() and q.requires_grad:
            # The backward of `negatives` reads the queue as it is now: write the new entries once
            # q's gradient exists, i.e. once every use of the queue in this graph has been differentiated.
            self._pending = (w_all, labels_all)
            q.register_hook(self._enqueue_after_backward)
        else:
            self.queue.enqueue(w_all, labels_all)
        return HeadOutput(loss=loss, logits=logits, targets=targets)

    def _enqueue_after_backward(self, grad: torch.Tensor) -> None:
        self.flush()

    def flush(self) -> None:
        """Enqueue the last batch's weights now if its backward has not done it yet."""
        if self._pending is not None:
            weights, labels = self._pending
            self._pending = None
            self.queue.enqueue(weights, labels)

    def metrics(self) -> dict[str, float]:
        return {"queue_fill": self.queue.fill_ratio}

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, queue_size={self.queue.size}, margin={self.margin}, "
            f"in_batch_negatives={self.in_batch_negatives}, dedup={self.dedup}"
        )
