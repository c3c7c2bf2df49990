"""Model size and cost: parameters and multiply-adds per image, counted without allocating the model.

The backbone is built on PyTorch's meta device (shapes only) and one 1-image forward pass in eval
mode runs under `torch.utils.flop_counter.FlopCounterMode`, which counts the matrix products
(convolutions, linear layers, attention's q k^T and weights v) at 2 FLOPs per multiply-add. Half
of it is the multiply-add count, the convention of insightface's arcface_torch model table (its
"GFLOPs" are multiply-adds: r50 6.3, mbf 0.45, vit_t 1.5). Normalisation, activations and additions
are not counted (under 1% of any of these models).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def _meta_backbone(name: str, embedding_size: int, image_size: int):
    from dcq.models import get_backbone

    with torch.device("meta"):
        return get_backbone(name, embedding_size=embedding_size, image_size=image_size).eval()


def parameter_count(name: str, embedding_size: int = 512, image_size: int = 112) -> int:
    """Parameters of the backbone (trainable or not; buffers such as BatchNorm statistics excluded)."""
    return sum(p.numel() for p in _meta_backbone(name, embedding_size, image_size).parameters())


def multiply_adds(name: str, embedding_size: int = 512, image_size: int = 112) -> int:
    """Multiply-adds of one image's forward pass in eval mode."""
    model = _meta_backbone(name, embedding_size, image_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty(1, 3, image_size, image_size, device="meta"))
    return counter.get_total_flops() // 2
