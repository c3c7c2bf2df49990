"""Backbones: `get_backbone(name, embedding_size, image_size)`."""

from __future__ import annotations

from torch import nn

from dcq.models.cpunet import CPUNet
from dcq.models.iresnet import LAYERS, IResNet
from dcq.models.mlp import MLPNet

BACKBONES = (*LAYERS, "cpunet", "mlp")


def image_size_problem(name: str, image_size: int) -> str | None:
    """Why `name` cannot take `image_size` pixels (naming the sizes that work), or None."""
    if name in LAYERS and (image_size < 16 or image_size % 16):
        return f"{name} takes image sizes divisible by 16 (112 is standard; e.g. 64, 96, 112, 128)"
    if name == "cpunet" and image_size < 16:
        return "cpunet takes images of at least 16 px (40 is its default)"
    return None


def get_backbone(name: str, embedding_size: int = 512, image_size: int | None = None, **kwargs) -> nn.Module:
    """A backbone by name: iresnet18/34/50/100 (112 px by default), cpunet (40 px by default), or mlp
    (BatchNorm-free, for exactness tests)."""
    problem = image_size_problem(name, image_size) if image_size is not None else None
    if problem:
        raise ValueError(f"image_size={image_size}: {problem}")
    if name in LAYERS:
        return IResNet(LAYERS[name], embedding_size=embedding_size, image_size=image_size or 112, **kwargs)
    if name == "cpunet":
        return CPUNet(embedding_size=embedding_size, image_size=image_size or 40, **kwargs)
    if name == "mlp":
        return MLPNet(embedding_size=embedding_size, image_size=image_size or 16, **kwargs)
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


__all__ = ["get_backbone", "image_size_problem", "IResNet", "CPUNet", "MLPNet", "BACKBONES"]
