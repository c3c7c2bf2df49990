"""Backbones: `get_backbone(name, embedding_size, image_size)`."""

from __future__ import annotations

from torch import nn

from dcq.models.cpunet import CPUNet
from dcq.models.iresnet import LAYERS, IResNet
from dcq.models.mlp import MLPNet

BACKBONES = (*LAYERS, "cpunet", "mlp")


def get_backbone(name: str, embedding_size: int = 512, image_size: int | None = None, **kwargs) -> nn.Module:
    """A backbone by name: iresnet18/34/50/100 (112 px by default), cpunet (40 px by default), or mlp
    (BatchNorm-free, for exactness tests)."""
    if name in LAYERS:
        return IResNet(LAYERS[name], embedding_size=embedding_size, image_size=image_size or 112, **kwargs)
    if name == "cpunet":
        return CPUNet(embedding_size=embedding_size, image_size=image_size or 40, **kwargs)
    if name == "mlp":
        return MLPNet(embedding_size=embedding_size, image_size=image_size or 16, **kwargs)
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


__all__ = ["get_backbone", "IResNet", "CPUNet", "MLPNet", "BACKBONES"]
