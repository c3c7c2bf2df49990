"""CPUNet: a small IR-style network that trains in minutes on a laptop CPU at 32-64 px.

Built from the iresnet pieces (BN/PReLU convolutions, an improved residual block, the
BN-FC-BN embedding head) but sized for a CPU: three stride-2 convolutions bring 40 px down to
5 px before any wide layer runs, then `blocks` residual blocks at the lowest resolution.
About 11 MFLOPs per 40 px image, ~15x less than a narrow ResNet at full resolution, which is
what makes `dcq demo` fit in minutes. It is not meant to compete with iresnet50 on real faces.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dcq.models.iresnet import BN_EPS, EmbeddingHead, IBasicBlock, _init_weights, conv3x3


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(conv3x3(cin, cout, stride=2), nn.BatchNorm2d(cout, eps=BN_EPS), nn.PReLU(cout))


class CPUNet(nn.Module):
    def __init__(
        self,
        embedding_size: int = 128,
        image_size: int = 40,
        widths: tuple[int, ...] = (32, 64, 128),
        blocks: int = 1,
        dropout: float = 0.0,
    ):
        super().__init__()
        if image_size < 16:
            raise ValueError(f"cpunet needs images of at least 16 px, got {image_size}")
        self.image_size = image_size
        self.embedding_size = embedding_size
        layers, cin, spatial = [], 3, image_size
        for cout in widths:
            layers.append(_down(cin, cout))
            cin, spatial = cout, math.ceil(spatial / 2)
        layers += [IBasicBlock(cin, cin) for _ in range(blocks)]
        self.body = nn.Sequential(*layers)
        self.head = EmbeddingHead(cin, spatial, embedding_size, dropout)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
