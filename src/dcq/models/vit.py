"""Vision Transformers as insightface's arcface_torch builds them for face recognition (`vit_t/s/b`).

112 px images are cut into 9 px patches (a stride-9 convolution: 12 x 12 = 144 tokens; the last
4 pixel rows and columns fall outside every patch, as in arcface_torch), a learned position
embedding is added, and pre-norm transformer blocks (multi-head attention without qkv bias, an MLP
of 4x width with ReLU6) follow. There is no class token: the normalised tokens are flattened and
projected to the embedding by Linear - BN - Linear - BN (BatchNorm eps 2e-5).

Training-time regularisers, arcface_torch's defaults for all three sizes: stochastic depth rising
linearly to `drop_path` (0.1) over the blocks, and token masking: each image keeps a random
(1 - `mask_ratio`) of its tokens through the blocks, the others are replaced by a learned
`mask_token` before the projection. Both are off in eval mode. In DCQ the weight generator computes
keys in train mode (docs/method.md), so its keys see them too.

Attention scores and softmax run in float32 even under autocast (arcface_torch does the same):
fp16 logits of 144 tokens overflow.

Module names are arcface_torch's (`patch_embed.proj`, `pos_embed`, `blocks.N.{norm1,attn.qkv,
attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`, `feature.{0..3}`, `mask_token`), so the state_dict is an
arcface_torch `backbone.pth` key for key.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

PATCH = 9
# arcface_torch get_model name -> (width, depth, heads)
VIT_SIZES = {"vit_t": (256, 12, 8), "vit_s": (512, 12, 8), "vit_b": (512, 24, 8)}


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: the residual branch of a random p of the samples is dropped, the rest scaled."""
    if not training or p == 0.0:
        return x
    keep = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(1 - p)
    return x * keep / (1 - p)


def _float32(device_type: str):
    """A context without autocast on the devices that have one (the meta device has none)."""
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class PatchEmbed(nn.Module):
    def __init__(self, image_size: int, patch_size: int, dim: int):
        super().__init__()
        self.grid = image_size // patch_size
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, tokens, dim)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # q, k, v: (B, heads, tokens, width / heads) each
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        with _float32(x.device.type):
            weights = ((q.float() @ k.float().transpose(-2, -1)) * self.scale).softmax(dim=-1)
            out = (weights @ v.float()).transpose(1, 2).flatten(2)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + _drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + _drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class VisionTransformer(nn.Module):
    def __init__(
        self,
        embedding_size: int = 512,
        image_size: int = 112,
        dim: int = 256,
        depth: int = 12,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        patch_size: int = PATCH,
        drop_path: float = 0.1,
        mask_ratio: float = 0.1,
        dropout: float = 0.0,
    ):
        super().__init__()
        if image_size < 2 * patch_size:
            raise ValueError(f"vit needs images of at least {2 * patch_size} px ({patch_size} px patches), "
                             f"got {image_size}")
        if dim % heads:
            raise ValueError(f"vit width {dim} is not divisible by its {heads} heads")
        self.image_size = image_size
        self.embedding_size = embedding_size
        self.mask_ratio = float(mask_ratio)
        self.patch_embed = PatchEmbed(image_size, patch_size, dim)
        self.num_patches = self.patch_embed.grid ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, dim))
        rates = [drop_path * i / max(1, depth - 1) for i in range(depth)]  # python floats: works on meta too
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio, p) for p in rates])
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(p=dropout)
        self.feature = nn.Sequential(
            nn.Linear(dim * self.num_patches, dim, bias=False),
            nn.BatchNorm1d(dim, eps=2e-5),
            nn.Linear(dim, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=2e-5),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        b, n, d = x.shape
        masking = self.training and self.mask_ratio > 0
        if masking:  # keep a random subset of tokens per image; `order` puts them back afterwards
            kept = int(n * (1 - self.mask_ratio))
            order = torch.rand(b, n, device=x.device).argsort(dim=1)
            x = x.gather(1, order[:, :kept, None].expand(-1, -1, d))
        for block in self.blocks:
            x = block(x)
        x = self.norm(x.float())
        if masking:
            x = torch.cat([x, self.mask_token.to(x.dtype).expand(b, n - kept, d)], dim=1)
            x = x.gather(1, order.argsort(dim=1)[:, :, None].expand(-1, -1, d))
        return self.feature(self.dropout(x.flatten(1)))
