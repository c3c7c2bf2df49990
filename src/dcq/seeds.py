"""Seeds of the independent random streams one run draws from, all derived from its `seed`.

Each stream (a DataLoader's shuffling generator per epoch, a worker's flip generator, a block of
initial class centres, the shuffle-BN permutation of a step, an item's augmentation) gets its own
`torch.Generator` seeded by a fixed function of (seed, stream index), so a stream never depends on
how many numbers another one drew, and a resumed run draws what an uninterrupted one would have.
The formulas are kept as they were when the first runs were recorded, so recorded runs reproduce.
"""

from __future__ import annotations

_STREAM = 1_000_003  # prime: seed * _STREAM + index does not collide for indices below it
_ITEM = 10_000_019


def stream_seed(seed: int, index: int) -> int:
    """The seed of stream `index` (an epoch, a worker, a block, a step) of a run seeded with `seed`."""
    return int(seed) * _STREAM + int(index)


def item_seed(seed: int, epoch: int, position: int) -> int:
    """The augmentation seed of the item at `position` of `epoch` (below 2**63 - 1)."""
    return (stream_seed(seed, epoch) * _ITEM + int(position)) % (2**63 - 1)
