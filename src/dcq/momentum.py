"""MomentumEncoder: the weight generator, an exponential moving average of the feature extractor.

    theta_k <- m * theta_k + (1 - m) * theta_q          (m = 0.999)

It is never trained: its parameters have requires_grad=False, it is not given to the optimiser, and
its forward always runs under no_grad. Floating-point buffers (BatchNorm running statistics) follow
the same average, integer buffers (num_batches_tracked) are copied.

Keys are computed with BatchNorm in *train* mode, as the official DCQ/MoCo code does. Shuffle-BN:
the reference batch holds the same identities, in the same order, as the sample batch, so batch
statistics could leak which item is which.
- With one process, `bn_splits=G` permutes the batch, splits it into G groups, normalises each with
  its own statistics and restores the original order (G=1, the default, is plain BN).
- With several processes, `shuffle_bn=True` does what MoCo's `_batch_shuffle_ddp` does: every rank
  all-gathers the reference batch, permutes the global batch with a permutation drawn from a seed
  that all ranks share, computes keys for its own slice of the permuted batch (so BatchNorm sees
  items of every rank), all-gathers the keys and takes back its own items in their original order.
  `bn_splits` still splits each rank's slice. Without a process group it does nothing.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dcq import distributed


class MomentumEncoder(nn.Module):
    def __init__(self, encoder: nn.Module, momentum: float = 0.999, bn_splits: int = 1, shuffle_bn: bool = False):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if bn_splits < 1:
            raise ValueError(f"bn_splits must be >= 1, got {bn_splits}")
        self.momentum = float(momentum)
        self.bn_splits = int(bn_splits)
        self.shuffle_bn = bool(shuffle_bn)
        self.encoder = copy.deepcopy(encoder)
        for p in self.encoder.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, online: nn.Module, momentum: float | None = None) -> None:
        """EMA step towards `online` (same architecture)."""
        m = self.momentum if momentum is None else float(momentum)
        ema_k, ema_q = [], []
        pairs = list(zip(self.encoder.parameters(), online.parameters(), strict=True))
        pairs += list(zip(self.encoder.buffers(), online.buffers(), strict=True))
        for t_k, t_q in pairs:
            if t_k.is_floating_point():
                ema_k.append(t_k)
                ema_q.append(t_q.detach().to(t_k.dtype))
            else:
                t_k.copy_(t_q)
        if ema_k:  # one fused multi-tensor op instead of two kernels per tensor
            torch._foreach_lerp_(ema_k, ema_q, 1.0 - m)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, seed: int | None = None, prepare=None) -> torch.Tensor:
        """Keys of `images`. `seed` picks the cross-rank permutation and must be equal on every rank
        (the trainer passes one derived from the config seed and the step); None draws it from
        rank 0's global RNG. `prepare` maps the images to the encoder's input (uint8 -> [-1, 1]); it
        runs after the cross-rank gather, so shuffle-BN moves uint8, a quarter of float32's bytes."""
        if self.shuffle_bn and distributed.is_distributed():
            return self._across_ranks(images, seed, prepare)
        return self._local(images if prepare is None else prepare(images))

    def _local(self, images: torch.Tensor) -> torch.Tensor:
        if self.bn_splits == 1 or images.shape[0] < 2 * self.bn_splits:
            return self.encoder(images)
        perm = torch.randperm(images.shape[0], device=images.device)
        shuffled = torch.cat([self.encoder(chunk) for chunk in images[perm].chunk(self.bn_splits)])
        out = torch.empty_like(shuffled)
        out[perm] = shuffled
        return out

    def _across_ranks(self, images: torch.Tensor, seed: int | None, prepare=None) -> torch.Tensor:
        local, rank = images.shape[0], distributed.rank()
        everything = distributed.all_gather_cat(images)  # (W * b, ...) in rank order
        if seed is None:
            seed = distributed.broadcast_object(int(torch.randint(0, 2**62, ()).item()))  # off-device: a seed
        perm = torch.randperm(everything.shape[0],  # off-device: a host generator, the same on every rank
                              generator=torch.Generator().manual_seed(int(seed)))
        perm = perm.to(images.device)
        mine = perm[rank * local : (rank + 1) * local]  # global positions of the items this rank encodes
        mine_images = everything[mine] if prepare is None else prepare(everything[mine])
        keys = distributed.all_gather_cat(self._local(mine_images))  # keys[j] belongs to item perm[j]
        out = torch.empty_like(keys)
        out[perm] = keys
        return out[rank * local : (rank + 1) * local]
