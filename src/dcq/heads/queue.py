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
        # off-device: module state, moved to the training device with the head (.to(device))
        self.register_buffer("weights", torch.zeros(self.size, self.dim, dtype=dtype))  # off-device: as above
        self.register_buffer("labels", torch.full((self.size,), EMPTY, dtype=torch.long))  # off-device: as above
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # off-device: as above
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # off-device: as above

    @property
    def filled(self) -> int:
        """Number of occupied slots (reads the device: for logging, not for the training step)."""
        return int(self.count)

    @property
    def fill_ratio(self) -> float:
        return self.filled / self.size

    @torch.no_grad()
    def enqueue(self, weights: torch.Tensor, labels: torch.Tensor) -> None:
        """Write `weights` (n, dim) and `labels` (n,) at the pointer, in place, wrapping around the end.

        Nothing is read back to the host: the slots follow from the pointer on the device. The
        buffers are written in place, so a caller that computed logits from `self.weights` must
        enqueue only once autograd no longer needs them (DynamicClassQueue does it after the
        backward has consumed its logits).
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
            skipped = n - self.size
        else:
            skipped = 0
        kept = weights.shape[0]
        slots = (self.ptr + skipped + torch.arange(kept, device=self.labels.device)) % self.size
        self.weights.index_copy_(0, slots, weights.to(self.weights.dtype))
        self.labels.index_copy_(0, slots, labels.to(self.labels.device))
        self.ptr.add_(n).remainder_(self.size)
        self.count.add_(n).clamp_(max=self.size)

    @torch.no_grad()
    def clear(self) -> None:
        self.weights.zero_()
        self.labels.fill_(EMPTY)
        self.ptr.zero_()
        self.count.zero_()

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"
