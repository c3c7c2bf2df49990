"""MLPNet: a two-layer perceptron on raw pixels, without BatchNorm.

Not a face model: it exists so that tests can check exact equalities that BatchNorm would break
(e.g. one process with batch B against two processes with B/2 each, where BatchNorm statistics
legitimately differ).
"""

from __future__ import annotations

import torch
from torch import nn


class MLPNet(nn.Module):
    def __init__(self, embedding_size: int = 128, image_size: int = 16, hidden: int = 64, dropout: float = 0.0):
        super().__init__()
        self.image_size = image_size
        self.embedding_size = embedding_size
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size * image_size, hidden), nn.PReLU(hidden),
                                  nn.Dropout(dropout), nn.Linear(hidden, embedding_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)
