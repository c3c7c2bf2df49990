"""Refuse a model that cannot fit before allocating it.

The backbone is built on PyTorch's ``meta`` device (shapes only, no memory), so its size is known
without allocating it; the head's state follows from the config. The estimate is a lower bound of
the training state (weights, gradients, optimiser state, the weight generator's copy, the head)
without activations; a run whose lower bound exceeds the free memory of its device cannot succeed.
"""

from __future__ import annotations

import torch

from dcq.errors import DcqError
from dcq.resources import available_memory, format_bytes


def training_state_bytes(cfg, num_identities: int, queue_size: int | None, backbone_params: int,
                         world_size: int = 1) -> int:
    """Bytes one rank holds; FC and Partial FC shard their class centres (and optimiser rows) over
    the `world_size` ranks, DCQ's queue is replicated."""
    optimiser_copies = 2 if cfg.optimizer == "adamw" else (1 if cfg.sgd_momentum else 0)
    per_param = 1 + 1 + optimiser_copies  # weight, gradient, optimiser state
    backbone = backbone_params * (per_param + (1 if cfg.head == "dcq" else 0))  # + weight generator
    if cfg.head == "dcq":
        head = (queue_size or 0) * (cfg.embedding_size + 2)  # queue weights + int64 labels
    else:
        head = -(-num_identities // world_size) * cfg.embedding_size * per_param  # this rank's rows
    return 4 * (backbone + head)


def backbone_parameter_count(cfg) -> int:
    from dcq.models import get_backbone

    with torch.device("meta"):
        net = get_backbone(cfg.backbone, embedding_size=cfg.embedding_size, image_size=cfg.image_size,
                           dropout=cfg.dropout)
    return sum(p.numel() for p in net.parameters()) + sum(b.numel() for b in net.buffers())


def check_fits(cfg, num_identities: int, queue_size: int | None, device: torch.device, world_size: int = 1) -> None:
    need = training_state_bytes(cfg, num_identities, queue_size, backbone_parameter_count(cfg), world_size)
    free = available_memory(device)
    if need > free:
        raise DcqError(
            f"the model ({cfg.backbone}, embedding_size={cfg.embedding_size}, image_size={cfg.image_size}) and "
            f"{cfg.head} head for {num_identities} identities need at least {format_bytes(need)} of training state "
            f"but {format_bytes(free)} is free on {device}; lower embedding_size or use a smaller model"
        )
