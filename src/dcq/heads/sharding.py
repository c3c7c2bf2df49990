"""Class centres sharded over ranks, the way insightface's Partial FC v2 shards them.

With `distributed=True` a classification head keeps only its rank's contiguous slice of the N
class centres (`ClassShard`: rows `start:stop`, about N/W of them), so weights, gradients and
optimiser state cost N/W x d per rank instead of N x d. Each rank all-gathers the embeddings and
labels of the global batch, computes the cosine logits of *every* row against *its* centres, and the
margin softmax is finished across ranks: the row maximum is all-reduced with MAX, the sum of
exponentials and the target logit with SUM (`sharded_cross_entropy`). The loss is the mean over the
global batch, equal to a single process's loss on the whole batch.

Checkpoints do not depend on the world size: `state_dict()` gathers the full N-row tensors to rank
0's host memory, one rank's rows at a time (a collective: call it on every rank; the other ranks'
state_dict keeps their own rows, and only rank 0 writes), `load_state_dict()` takes the full
tensors and keeps this rank's rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dcq import distributed
from dcq.seeds import stream_seed

INIT_BLOCK = 65536  # rows per independently seeded block of the initial class centres
INIT_STD = 0.01


@dataclass(frozen=True)
class ClassShard:
    """Rows `start:stop` of `num_classes` centres live on `rank` (of `world_size`)."""

    num_classes: int
    rank: int = 0
    world_size: int = 1

    @classmethod
    def for_this_rank(cls, num_classes: int, enabled: bool) -> ClassShard:
        if not enabled:
            return cls(num_classes)
        return cls(num_classes, distributed.rank(), distributed.world_size())

    def bounds(self, rank: int) -> tuple[int, int]:
        base, extra = divmod(self.num_classes, self.world_size)
        start = rank * base + min(rank, extra)
        return start, start + base + (1 if rank < extra else 0)

    @property
    def start(self) -> int:
        return self.bounds(self.rank)[0]

    @property
    def stop(self) -> int:
        return self.bounds(self.rank)[1]

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    def counts(self) -> list[int]:
        return [b - a for a, b in (self.bounds(r) for r in range(self.world_size))]

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Full (N, ...) tensor on rank 0's host from every rank's rows (collective when sharded;
        other ranks get their own rows back)."""
        if not self.sharded:
            return local
        return distributed.gather_rows_to_main(local, self.counts())

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full (N, ...) tensor; a tensor that is already local passes."""
        if self.sharded and full.ndim >= 1 and full.shape[0] == self.num_classes:
            return full[self.start : self.stop]
        return full

    def local_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Column of each label among this rank's rows, -1 where the class lives on another rank."""
        inside = (labels >= self.start) & (labels < self.stop)
        return torch.where(inside, labels - self.start, torch.full_like(labels, -1))


def init_centres(num_classes: int, dim: int, start: int, stop: int, seed: int) -> torch.Tensor:
    """Rows `start:stop` of the initial N(0, 0.01^2) class centres, the same for every world size.

    The centres are drawn in blocks of INIT_BLOCK rows, each from its own generator seeded with
    (seed, block), so a rank draws only the blocks it overlaps and never materialises all N rows.
    """
    out = torch.empty(stop - start, dim)  # off-device: initial state, moved with the head
    first, last = start // INIT_BLOCK, (max(stop, start + 1) - 1) // INIT_BLOCK
    for block in range(first, last + 1):
        lo, hi = block * INIT_BLOCK, min(num_classes, (block + 1) * INIT_BLOCK)
        gen = torch.Generator().manual_seed(stream_seed(seed, block))
        rows = torch.normal(0.0, INIT_STD, (hi - lo, dim), generator=gen)
        a, b = max(lo, start), min(hi, stop)
        if a < b:
            out[a - start : b - start] = rows[a - lo : b - lo]
    return out


class _ShardedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor):
        rows = logits.shape[0]
        if logits.shape[1]:
            top = logits.max(dim=1).values
        else:
            top = logits.new_full((rows,), float("-inf"))
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        exp = torch.exp(logits - top.unsqueeze(1))
        has = targets >= 0
        target_logit = torch.zeros_like(top)
        target_logit[has] = logits[has, targets[has]]
        sums = torch.stack([exp.sum(dim=1), target_logit])
        dist.all_reduce(sums)
        total, target_logit = sums[0], sums[1]
        ctx.save_for_backward(exp / total.unsqueeze(1), targets)
        loss = (total.log() + top - target_logit).mean()
        hits = target_logit >= top  # the positive holds the global maximum
        ctx.mark_non_differentiable(hits)
        return loss, hits

    @staticmethod
    def backward(ctx, grad_loss, _grad_hits):
        prob, targets = ctx.saved_tensors
        grad = prob.clone()
        has = torch.nonzero(targets >= 0, as_tuple=True)[0]
        grad[has, targets[has]] -= 1.0
        return grad * (grad_loss / prob.shape[0]), None


def sharded_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of rows whose columns are split over ranks.

    `logits` (B, n_r): this rank's columns for all B rows of the global batch; `targets` (B,): the
    row's positive column on this rank or -1. Returns (loss, hits): the loss every rank agrees on,
    and per row whether its positive logit is the largest over all ranks' columns.
    """
    return _ShardedCrossEntropy.apply(logits, targets)


def add_state_dict_sharding(module: torch.nn.Module, is_sharded) -> None:
    """Make `module.state_dict()` gather, and `load_state_dict()` slice, the entries sharded by `module.shard`.

    `is_sharded(name)` tells which of the module's own entries hold one row per class. The choice
    depends on names only, never on shapes, so every rank runs the same gathers in the same order.
    """

    def own(prefix, key):
        name = key[len(prefix):]
        return key.startswith(prefix) and "." not in name and is_sharded(name)

    def gather_hook(mod, state_dict, prefix, local_metadata):
        if mod.shard.sharded:
            for key in sorted(k for k in state_dict if own(prefix, k)):
                state_dict[key] = mod.shard.gather(state_dict[key])

    def slice_hook(mod, state_dict, prefix, *args):
        for key in [k for k in state_dict if own(prefix, k)]:
            state_dict[key] = mod.shard.take(state_dict[key])

    module._register_state_dict_hook(gather_hook)
    module._register_load_state_dict_pre_hook(slice_hook, with_module=True)
