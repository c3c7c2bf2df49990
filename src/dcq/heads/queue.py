"""ClassQueue: a FIFO ring buffer of generated class weights and their identity labels.

DCQ's negatives are the class weights generated for the last `size` training items. Unlike the
official implementation, the queue starts *empty* (label -1) instead of random vectors with random
labels, so an empty slot can never act as a fake negative, and any queue size works with any batch
size: an enqueue that runs past the end wraps around to the start.
"""

from __future__ import annotations

import torch
from torch import nn

EMPTY = -1


class ClassQueue(nn.Module):
    """Ring buffer of `size` class weights of dimension `dim`; state lives in buffers.

    Buffers (and so `state_dict()`): `weights` (size, dim), `labels` (size,) int64 with -1 for an
    empty slot, `ptr` (the slot the next weight goes to) and `count` (weights ever enqueued, capped
    at size; tells how full the queue is).
    """

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        if int(size) < 1:
            raise ValueError(f"ClassQueue size must be >= 1, got {size}")
        if int(dim) < 1:
            raise ValueError(f"ClassQueue dim must be >= 1, got {dim}")
        self.size = int(size)
        self.dim = int(dim)
        self.register_buffer("weights", torch.zeros(self.size, self.dim, dtype=dtype))
        self.register_buffer("labels", torch.full((self.size,), EMPTY, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @property
    def filled(self) -> int:
        """Number of occupied slots."""
        return int(self.count)

    @property
    def fill_ratio(self) -> float:
        return self.filled / self.size

    @torch.no_grad()
    def enqueue(self, weights: torch.Tensor, labels: torch.Tensor) -> None:
        """Write `weights` (n, dim) and `labels` (n,) at the pointer, wrapping around the end.

        New tensors are assigned slot by slot with index_copy_, never by modifying a tensor that
        autograd saved: callers compute logits from `self.weights` *before* enqueueing, so the
        buffers are replaced rather than written in place (see `_replace`).
        """
        weights = weights.detach()
        labels = labels.detach().to(torch.long)
        if weights.ndim != 2 or weights.shape[1] != self.dim:
            raise ValueError(f"enqueue expects weights of shape (n, {self.dim}), got {tuple(weights.shape)}")
        if labels.shape != (weights.shape[0],):
            raise ValueError(f"enqueue expects labels of shape ({weights.shape[0]},), got {tuple(labels.shape)}")
        n = weights.shape[0]
        if n == 0:
            return
        if n > self.size:  # only the newest `size` entries survive a FIFO of this size
            weights, labels = weights[-self.size :], labels[-self.size :]
            start = (int(self.ptr) + n - self.size) % self.size
            n = self.size
        else:
            start = int(self.ptr)
        slots = (start + torch.arange(n, device=self.labels.device)) % self.size
        new_weights = self.weights.clone()
        new_labels = self.labels.clone()
        new_weights.index_copy_(0, slots, weights.to(new_weights.dtype))
        new_labels.index_copy_(0, slots, labels.to(new_labels.device))
        self.weights = new_weights
        self.labels = new_labels
        self.ptr.fill_((start + n) % self.size)
        self.count.fill_(min(self.size, int(self.count) + n))

    @torch.no_grad()
    def clear(self) -> None:
        self.weights.zero_()
        self.labels.fill_(EMPTY)
        self.ptr.zero_()
        self.count.zero_()

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"
