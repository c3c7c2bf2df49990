"""MobileFaceNet as insightface's arcface_torch builds it for `get_model("mbf")` (~0.45 GMACs at 112 px).

A phone-sized face network: a stride-2 3x3 stem, then inverted-residual bottlenecks (1x1 expand,
3x3 depthwise, 1x1 linear projection, identity shortcut inside a stage) that halve the resolution
three more times (112 -> 7), a 1x1 convolution to 512 channels, and the *global depthwise
convolution* (GDC) embedding: a depthwise kernel as large as the last feature map, then a linear
layer and BatchNorm1d. Width `scale` multiplies the stem and stage channels (arcface_torch: 2);
the expansion widths (128/256/512) are fixed numbers there, and so here.

Module names are arcface_torch's (`layers.N`, `conv_sep`, `features.layers.{0,2,3}`), so this
model's state_dict *is* an arcface_torch `backbone.pth` for `mbf`, key for key (see dcq.convert).
The GDC kernel is image_size / 16: 7 at 112 px as in arcface_torch; smaller images give smaller
kernels (16 px: 1), which is what lets tests run the real network on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvUnit(nn.Module):
    """Conv - BN (- PReLU); arcface_torch's ConvBlock (with PReLU) and LinearBlock (without)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1, prelu: bool = True):
        super().__init__()
        parts = [nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, groups=groups, bias=False),
                 nn.BatchNorm2d(cout)]
        if prelu:
            parts.append(nn.PReLU(cout))
        self.layers = nn.Sequential(*parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Bottleneck(nn.Module):
    """1x1 to `hidden` channels - 3x3 depthwise (stride) - 1x1 linear to `cout`, plus the input when
    `residual` (arcface_torch's DepthWise)."""

    def __init__(self, cin: int, cout: int, hidden: int, stride: int = 1, residual: bool = False):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvUnit(cin, hidden),
            ConvUnit(hidden, hidden, 3, stride=stride, padding=1, groups=hidden),
            ConvUnit(hidden, cout, prelu=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class Stage(nn.Module):
    """`blocks` residual bottlenecks at one resolution (arcface_torch's Residual)."""

    def __init__(self, channels: int, blocks: int, hidden: int):
        super().__init__()
        self.layers = nn.Sequential(*[Bottleneck(channels, channels, hidden, residual=True) for _ in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv over the whole map - flatten - (dropout) - linear - BatchNorm1d."""

    def __init__(self, channels: int, spatial: int, embedding_size: int, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.Sequential(
            ConvUnit(channels, channels, spatial, groups=channels, prelu=False),
            nn.Flatten(),
            nn.Linear(channels, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )
        self.dropout = nn.Dropout(p=dropout)  # no weights: the state_dict keeps arcface_torch's indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, flatten, fc, bn = self.layers
        return bn(fc(self.dropout(flatten(conv(x)))))


class MobileFaceNet(nn.Module):
    def __init__(
        self,
        embedding_size: int = 512,
        image_size: int = 112,
        blocks: tuple[int, int, int, int] = (1, 4, 6, 2),
        scale: int = 2,
        dropout: float = 0.0,
    ):
        super().__init__()
        if image_size < 16 or image_size % 16:
            raise ValueError(f"mbf needs an image size divisible by 16 (112 is standard), got {image_size}")
        self.image_size = image_size
        self.embedding_size = embedding_size
        low, high = 64 * scale, 128 * scale
        first = (ConvUnit(low, low, 3, padding=1, groups=64) if blocks[0] == 1
                 else Stage(low, blocks[0], hidden=128))
        self.layers = nn.ModuleList([
            ConvUnit(3, low, 3, stride=2, padding=1),  # 112 -> 56
            first,
            Bottleneck(low, low, hidden=128, stride=2),  # -> 28
            Stage(low, blocks[1], hidden=128),
            Bottleneck(low, high, hidden=256, stride=2),  # -> 14
            Stage(high, blocks[2], hidden=256),
            Bottleneck(high, high, hidden=512, stride=2),  # -> 7
            Stage(high, blocks[3], hidden=256),
        ])
        self.conv_sep = ConvUnit(high, 512)
        self.features = GDC(512, image_size // 16, embedding_size, dropout)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))
