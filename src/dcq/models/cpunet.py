"""CPUNet: a small IR-style network that trains in minutes on a laptop CPU at 32-64 px.

The same building blocks as iresnet (improved residual blocks, PReLU, BN-FC-BN embedding head), one
block per stage and narrower widths, three stride-2 stages (40 px -> 5 px). It is what `dcq demo` and
the tests train; it is not meant to compete with iresnet50 on real faces.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dcq.models.iresnet import BN_EPS, EmbeddingHead, IBasicBlock, _init_weights, conv3x3


class CPUNet(nn.Module):
    def __init__(
        self,
        embedding_size: int = 128,
        image_size: int = 40,
        widths: tuple[int, ...] = (32, 64, 128, 256),
        blocks: tuple[int, ...] = (1, 1, 1),
        dropout: float = 0.0,
    ):
        super().__init__()
        if image_size < 16:
            raise ValueError(f"cpunet needs images of at least 16 px, got {image_size}")
        self.image_size = image_size
        self.embedding_size = embedding_size
        self.stem = nn.Sequential(conv3x3(3, widths[0]), nn.BatchNorm2d(widths[0], eps=BN_EPS), nn.PReLU(widths[0]))
        stages, cin, spatial = [], widths[0], image_size
        for n, cout in zip(blocks, widths[1:], strict=True):
            stages += [IBasicBlock(cin, cout, stride=2)] + [IBasicBlock(cout, cout) for _ in range(n - 1)]
            cin, spatial = cout, math.ceil(spatial / 2)
        self.body = nn.Sequential(*stages)
        self.head = EmbeddingHead(cin, spatial, embedding_size, dropout)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))
