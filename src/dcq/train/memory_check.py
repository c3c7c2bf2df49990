"""Refuse a model that cannot fit before allocating it.

The backbone is built on PyTorch's ``meta`` device (shapes only, no memory), so its size is known
without allocating it; the head's state follows from the config. The estimate is a lower bound of
the training state (weights, gradients, optimiser state, the weight generator's copy, the head)
without activations; a run whose lower bound exceeds the free memory of its device cannot succeed.
"""

from __future__ import annotations

import torch

from dcq.errors import DcqError
from dcq.heads.registry import FLOAT_BYTES, head_spec, optimiser_copies
from dcq.resources import available_memory, format_bytes


def training_state_bytes(cfg, num_identities: int, backbone_params: int, world_size: int = 1) -> int:
    """Bytes one rank holds: the backbone's weights, gradients and optimiser state (and the weight
    generator's copy for heads that embed references), plus what the head's spec says its state
    takes on one of `world_size` ranks (FC and Partial FC shard their centres, DCQ's queue is replicated)."""
    spec = head_spec(cfg.head)
    per_param = 2 + optimiser_copies(cfg) + (1 if spec.needs_references else 0)
    return FLOAT_BYTES * backbone_params * per_param + spec.state_bytes(cfg, num_identities, world_size)


def backbone_parameter_count(cfg) -> int:
    from dcq.models import get_backbone

    with torch.device("meta"):
        net = get_backbone(cfg.backbone, embedding_size=cfg.embedding_size, image_size=cfg.image_size,
                           dropout=cfg.dropout)
    return sum(p.numel() for p in net.parameters()) + sum(b.numel() for b in net.buffers())


def check_fits(cfg, num_identities: int, device: torch.device, world_size: int = 1) -> None:
    need = training_state_bytes(cfg, num_identities, backbone_parameter_count(cfg), world_size)
    free = available_memory(device)
    if need > free:
        raise DcqError(
            f"the model ({cfg.backbone}, embedding_size={cfg.embedding_size}, image_size={cfg.image_size}) and "
            f"{cfg.head} head for {num_identities} identities need at least {format_bytes(need)} of training state "
            f"but {format_bytes(free)} is free on {device}; lower embedding_size or use a smaller model"
        )
