"""Backbones: `get_backbone(name, embedding_size, image_size)`, by dcq's names and arcface_torch's.

- iresnet18/34/50/100/200, and the same networks by insightface arcface_torch's names r18/r34/r50/
  r100/r200 (112 px by default);
- mbf: arcface_torch's MobileFaceNet (112 px by default);
- vit_t, vit_s, vit_b: arcface_torch's face Vision Transformers, 9 px patches (112 px by default);
- cpunet: a small IR-style network for CPU runs (40 px by default);
- mlp: BatchNorm-free, for exactness tests.

docs/models.md tables their parameters, FLOPs and CPU step time; `dcq.convert` maps arcface_torch
`backbone.pth` files to dcq checkpoints and back.
"""

from __future__ import annotations

from torch import nn

from dcq.models.cpunet import CPUNet
from dcq.models.iresnet import LAYERS, IResNet
from dcq.models.mlp import MLPNet
from dcq.models.mobilefacenet import MobileFaceNet
from dcq.models.vit import PATCH, VIT_SIZES, VisionTransformer

ALIASES = {f"r{name.removeprefix('iresnet')}": name for name in LAYERS}  # arcface_torch's names
BACKBONES = (*LAYERS, *ALIASES, "mbf", *VIT_SIZES, "cpunet", "mlp")


def canonical_name(name: str) -> str:
    """The backbone `name` builds, by dcq's name: r50 -> iresnet50; every other name is its own."""
    return ALIASES.get(name, name)


def image_size_problem(name: str, image_size: int) -> str | None:
    """Why `name` cannot take `image_size` pixels (naming the sizes that work), or None."""
    name = canonical_name(name)
    if (name in LAYERS or name == "mbf") and (image_size < 16 or image_size % 16):
        return f"{name} takes image sizes divisible by 16 (112 is standard; e.g. 64, 96, 112, 128)"
    if name in VIT_SIZES and image_size < 2 * PATCH:
        return (f"{name} takes images of at least {2 * PATCH} px, cut into {PATCH} px patches "
                f"(112 is standard: 12 x 12 patches)")
    if name == "cpunet" and image_size < 16:
        return "cpunet takes images of at least 16 px (40 is its default)"
    return None


def get_backbone(name: str, embedding_size: int = 512, image_size: int | None = None, **kwargs) -> nn.Module:
    """A backbone by name (see the module docstring); `kwargs` go to its class (e.g. dropout)."""
    problem = image_size_problem(name, image_size) if image_size is not None else None
    if problem:
        raise ValueError(f"image_size={image_size}: {problem}")
    key = canonical_name(name)
    if key in LAYERS:
        return IResNet(LAYERS[key], embedding_size=embedding_size, image_size=image_size or 112, **kwargs)
    if key == "mbf":
        return MobileFaceNet(embedding_size=embedding_size, image_size=image_size or 112, **kwargs)
    if key in VIT_SIZES:
        dim, depth, heads = VIT_SIZES[key]
        return VisionTransformer(embedding_size=embedding_size, image_size=image_size or 112, dim=dim,
                                 depth=depth, heads=heads, **kwargs)
    if key == "cpunet":
        return CPUNet(embedding_size=embedding_size, image_size=image_size or 40, **kwargs)
    if key == "mlp":
        return MLPNet(embedding_size=embedding_size, image_size=image_size or 16, **kwargs)
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


__all__ = ["get_backbone", "canonical_name", "image_size_problem", "IResNet", "CPUNet", "MLPNet", "MobileFaceNet",
           "VisionTransformer", "ALIASES", "BACKBONES"]
