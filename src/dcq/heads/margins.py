"""Margins on cosine logits, shared by every head.

All heads compute cos(theta) between an L2-normalised embedding and L2-normalised class weights,
then apply one margin to the target entry and scale everything by s. insightface's combined form
covers the common cases:

    target logit = s * (cos(m1 * theta + m2) - m3)        others = s * cos(theta)

CosFace is (1, 0, m), ArcFace (1, m, 0), SphereFace-like (m1, 0, 0). The ArcFace angle is taken from
a clamped cosine, and when theta + m2 would pass pi (where cos(theta + m) stops decreasing and the
margin would *help* a wrong sample) the target falls back to the monotone CosFace-style extension
cos(theta) - m2 * sin(m2), exactly as insightface's `easy_margin=False` path does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MARGIN_TYPES = ("cosface", "arcface", "combined", "none")


@dataclass(frozen=True)
class Margin:
    """target = scale * (cos(m1*theta + m2) - m3); non-targets = scale * cos(theta)."""

    scale: float = 64.0
    m1: float = 1.0
    m2: float = 0.0
    m3: float = 0.0

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        """Margin-applied, *unscaled* target cosine for a tensor of target cosines."""
        cos32 = cos if cos.dtype == torch.float64 else cos.float()
        if self.m1 == 1.0 and self.m2 == 0.0:
            out = cos32 - self.m3
        else:
            eps = 1e-7
            theta = torch.acos(cos32.clamp(-1.0 + eps, 1.0 - eps))
            boundary = (math.pi - self.m2) / self.m1  # where m1*theta + m2 reaches pi
            if self.m1 == 1.0:
                fallback = cos32 - self.m2 * math.sin(self.m2)  # insightface's continuation
            else:
                fallback = cos32 - 1.0 - math.cos(boundary)  # continuous at the boundary
            out = torch.where(theta <= boundary, torch.cos(self.m1 * theta + self.m2), fallback)
            out = out - self.m3
        return out.to(cos.dtype)

    def apply(self, cos: torch.Tensor, target_index: torch.Tensor) -> torch.Tensor:
        """Scaled logits with the margin applied at `cos[i, target_index[i]]` (rows with index -1 untouched)."""
        has = (target_index >= 0).unsqueeze(1)
        cols = target_index.clamp_min(0).unsqueeze(1)  # rows without a target rewrite column 0 unchanged
        target = cos.gather(1, cols)
        out = cos.scatter(1, cols, torch.where(has, self.target_logit(target), target))  # no host sync
        return out * self.scale


def make_margin(margin_type: str, scale: float, margin: float | tuple[float, float, float]) -> Margin:
    """Build a Margin from a name: 'cosface' (m3=m), 'arcface' (m2=m), 'combined' ((m1,m2,m3)), 'none'."""
    kind = margin_type.lower()
    if kind == "cosface":
        return Margin(scale=float(scale), m3=float(margin))
    if kind == "arcface":
        return Margin(scale=float(scale), m2=float(margin))
    if kind == "combined":
        if not isinstance(margin, (tuple, list)) or len(margin) != 3:
            raise ValueError(f"margin_type 'combined' needs margin=(m1, m2, m3), got {margin!r}")
        m1, m2, m3 = (float(v) for v in margin)
        return Margin(scale=float(scale), m1=m1, m2=m2, m3=m3)
    if kind == "none":
        return Margin(scale=float(scale))
    raise ValueError(f"unknown margin_type {margin_type!r}; choose one of {', '.join(MARGIN_TYPES)}")
