"""IR-ResNet (insightface's `iresnet`), the standard face-recognition backbone.

Improved residual block BN-Conv3x3-BN-PReLU-Conv3x3(stride)-BN with a 1x1-conv shortcut when the
shape changes; a 3x3 stem at full resolution; four stages of widths 64/128/256/512 that halve the
resolution (112 -> 7); then the embedding head BN - Dropout - FC - BN (the last BN's scale is fixed
to 1, as in insightface, so the embedding's scale is set by the preceding layers only).
"""

from __future__ import annotations

import torch
from torch import nn

from dcq.autocast import active_dtype

LAYERS = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
}
BN_EPS = 1e-5


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=BN_EPS)
        self.conv1 = conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.prelu = nn.PReLU(cout)
        self.conv2 = conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout, eps=BN_EPS)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class EmbeddingHead(nn.Module):
    """BN - Dropout - flatten - FC - BN(fixed scale): feature map -> embedding.

    Under autocast the FC and the last BatchNorm run in float32 (as insightface's arcface_torch runs
    them): the embedding is what the head normalises and compares, and a 25088 x 512 reduction in
    fp16 loses more than the speed is worth."""

    def __init__(self, channels: int, spatial: int, embedding_size: int, dropout: float = 0.0):
        super().__init__()
        self.bn2 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(channels * spatial * spatial, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=BN_EPS)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.dropout(self.bn2(x)), 1)
        if active_dtype(x.device.type) is not None:
            with torch.autocast(x.device.type, enabled=False):
                return self.features(self.fc(x.float()))
        return self.features(self.fc(x))


class IResNet(nn.Module):
    def __init__(
        self,
        layers: tuple[int, int, int, int],
        embedding_size: int = 512,
        image_size: int = 112,
        widths: tuple[int, ...] = (64, 128, 256, 512),
        dropout: float = 0.0,
    ):
        super().__init__()
        if image_size % 16:
            raise ValueError(f"iresnet needs an image size divisible by 16 (112 is standard), got {image_size}")
        self.image_size = image_size
        self.embedding_size = embedding_size
        self.conv1 = conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0], eps=BN_EPS)
        self.prelu = nn.PReLU(widths[0])
        stages, cin = [], widths[0]
        for blocks, cout in zip(layers, widths, strict=True):
            stage = [IBasicBlock(cin, cout, stride=2)] + [IBasicBlock(cout, cout) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.head = EmbeddingHead(cin, image_size // 16, embedding_size, dropout)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.head(x)


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0, 0.1)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
