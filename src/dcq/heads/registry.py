"""What the trainer knows about each head: one `HeadSpec` per head, registered in `HEADS`.

The trainer never asks which head it runs; where a run's set-up depends on the head (does the step
embed reference images, how many identities it needs, how much memory its state takes, which config
keys its saved state depends on, how to build it from the config), it reads the spec. Adding a head
is its module plus one entry in `HEADS`.

Specs read the run's config by attribute (`dcq.train.config.TrainConfig`, or anything with the same
attributes), so this module sits below training and imports nothing from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dcq.errors import DcqError
from dcq.heads.base import Head
from dcq.heads.dcq import DynamicClassQueue
from dcq.heads.full_fc import FullFC
from dcq.heads.partial_fc import PartialFC

FLOAT_BYTES = 4


@dataclass(frozen=True)
class HeadSpec:
    name: str  # the config's `head` value
    # (cfg, num_identities, distributed, world_size) -> the head; `distributed`: under torchrun
    build: Callable[[Any, int, bool, int], Head]
    # (cfg, num_identities, world_size) -> bytes of head state one rank holds (weights, gradients,
    # optimiser state): what the memory check adds to the backbone's
    state_bytes: Callable[[Any, int, int], int]
    needs_references: bool = False  # the step embeds reference images with the weight generator
    min_identities: int = 1
    # config keys baked into this head's saved state -> what a change would break (--resume refuses)
    resume_keys: dict[str, str] = field(default_factory=dict)


def optimiser_copies(cfg) -> int:
    """Tensors per trained parameter besides itself and its gradient (SGD momentum, Adam's moments)."""
    return 2 if cfg.optimizer == "adamw" else (1 if cfg.sgd_momentum else 0)


# -- DCQ --------------------------------------------------------------------------------------------
IN_BATCH_MIN_BATCHES = 2.0  # "auto" in-batch negatives: on when the queue holds this many global batches


def resolve_queue_size(cfg, num_identities: int) -> int:
    """DCQ's queue length: `queue_size` entries, or `queue_fraction` of the identities."""
    size = cfg.queue_size if cfg.queue_size else max(1, round(cfg.queue_fraction * num_identities))
    if size > num_identities:
        raise DcqError(
            f"queue_size={size} is larger than the number of identities ({num_identities}); "
            "a queue holds negatives of other identities, so use at most that many (the paper uses ~10%)"
        )
    return size


def uses_in_batch_negatives(cfg, queue_size: int, world_size: int = 1) -> bool:
    """`in_batch_negatives` as set, or for "auto": whether the queue spans at least
    IN_BATCH_MIN_BATCHES global batches. A queue that short holds the last batch or two, as fresh
    as the batch itself, and the batch's weights add nothing it lacks; a queue of many batches holds
    weights from generators up to many steps old, and the batch's own weights are the freshest
    negatives there are (docs/results.md, "One in-batch rule")."""
    if cfg.in_batch_negatives != "auto":
        return bool(cfg.in_batch_negatives)
    return queue_size >= IN_BATCH_MIN_BATCHES * cfg.batch_size * world_size


def _build_dcq(cfg, num_identities: int, distributed: bool, world_size: int) -> Head:
    queue_size = resolve_queue_size(cfg, num_identities)
    return DynamicClassQueue(
        embedding_size=cfg.embedding_size, queue_size=queue_size, scale=cfg.scale, margin=cfg.margin,
        margin_type=cfg.margin_type, in_batch_negatives=uses_in_batch_negatives(cfg, queue_size, world_size),
        dedup=cfg.dedup, distributed=distributed)


def _dcq_state_bytes(cfg, num_identities: int, world_size: int) -> int:
    """The queue, the same on every rank: weights and int64 labels (two floats' worth)."""
    return FLOAT_BYTES * resolve_queue_size(cfg, num_identities) * (cfg.embedding_size + 2)


# -- FC and Partial FC --------------------------------------------------------------------------------
def _centres_bytes(cfg, num_identities: int, world_size: int) -> int:
    """This rank's share of the class centres with their gradients and optimiser state."""
    rows = -(-num_identities // world_size)
    return FLOAT_BYTES * rows * cfg.embedding_size * (2 + optimiser_copies(cfg))


def _build_fc(cfg, num_identities: int, distributed: bool, world_size: int) -> Head:
    return FullFC(cfg.embedding_size, num_identities, scale=cfg.scale, margin=cfg.margin,
                  margin_type=cfg.margin_type, seed=cfg.seed, distributed=distributed)


def _build_pfc(cfg, num_identities: int, distributed: bool, world_size: int) -> Head:
    return PartialFC(cfg.embedding_size, num_identities, sample_rate=cfg.sample_rate, scale=cfg.scale,
                     margin=cfg.margin, margin_type=cfg.margin_type, seed=cfg.seed, distributed=distributed)


HEADS: dict[str, HeadSpec] = {spec.name: spec for spec in (
    HeadSpec("dcq", _build_dcq, _dcq_state_bytes, needs_references=True, min_identities=2,
             resume_keys={"queue_size": "the head's queue", "queue_fraction": "the head's queue"}),
    HeadSpec("fc", _build_fc, _centres_bytes),
    HeadSpec("pfc", _build_pfc, _centres_bytes),
)}


def head_spec(name: str) -> HeadSpec:
    try:
        return HEADS[name]
    except KeyError:
        raise DcqError(f"config: head={name!r} is not one of {', '.join(HEADS)}") from None
