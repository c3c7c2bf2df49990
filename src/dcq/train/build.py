"""Everything a run trains, built from its config: the feature extractor (and its DDP wrapper), the
weight generator, the head, the optimiser coupled to the head, the learning-rate schedule, the
GradScaler and the one `TrainStep` that updates them all.

Construction order is part of reproducibility: the backbone draws its initial weights from the
global torch RNG first, then the head (whose class centres have their own seeded generators), and
the weight generator copies the backbone last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dcq.heads.base import Head
from dcq.heads.registry import head_spec
from dcq.models import get_backbone
from dcq.momentum import MomentumEncoder
from dcq.train.config import TrainConfig
from dcq.train.step import TrainStep


def build_head(cfg: TrainConfig, num_identities: int, distributed: bool = False, world_size: int = 1) -> Head:
    """The configured head, built by its spec (`dcq.heads.registry`); `distributed`: DCQ all-gathers
    its enqueued keys so every rank holds the same queue, FC and Partial FC shard their class centres."""
    return head_spec(cfg.head).build(cfg, num_identities, distributed, world_size)


def build_optimizer(cfg: TrainConfig, backbone: nn.Module, head: Head) -> torch.optim.Optimizer:
    """SGD or AdamW over the trained parameters, bound to the head (Partial FC hooks its sampled
    rows into this optimiser's steps)."""
    params = [p for p in list(backbone.parameters()) + list(head.parameters()) if p.requires_grad]
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    head.bind_optimizer(optimizer)
    return optimizer


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """Linear warm-up, then step decay at epoch milestones or cosine to zero."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "cosine":
        progress = (step - warmup) / max(1.0, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    passed = sum(1 for m in cfg.milestones if step >= m * steps_per_epoch)
    return cfg.lr_decay**passed


@dataclass
class TrainingParts:
    """What one run trains (feature extractor, weight generator, head) and what updates them
    (optimiser, schedule, GradScaler and the `TrainStep` that runs one update)."""

    feature_extractor: nn.Module  # the backbone trained by SGD
    forward_model: nn.Module  # the feature extractor, wrapped in DDP when distributed
    weight_generator: MomentumEncoder | None  # DCQ only: the EMA copy that embeds references
    head: Head
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    update: TrainStep  # one training step: `update(samples, references, labels)`

    def eval_encoder(self) -> nn.Module:
        """What evaluation embeds with: the weight generator when there is one (as DCQ evaluates)."""
        return self.weight_generator.encoder if self.weight_generator is not None else self.feature_extractor


def build_model(cfg: TrainConfig, num_identities: int, ctx, steps_per_epoch: int, total_steps: int,
                resuming: bool = False, notes: list[str] | None = None) -> TrainingParts:
    """Build every trained part on `ctx.device` (`ctx`: `dcq.distributed` context). `init_from`
    starts the backbone (and so the weight generator, its copy) from a pretrained model, unless the
    run resumes from a checkpoint, whose weights win; what happened is appended to `notes`."""
    device = ctx.device
    backbone = get_backbone(cfg.backbone, embedding_size=cfg.embedding_size, image_size=cfg.image_size,
                            dropout=cfg.dropout).to(device)
    if cfg.channels_last and device.type == "cuda":
        backbone = backbone.to(memory_format=torch.channels_last)  # the weight generator's copy is too
    if cfg.init_from:  # before the weight generator copies the backbone
        from dcq.convert import init_backbone

        note = (f"init_from={cfg.init_from} not read: a resumed run starts from its checkpoint" if resuming
                else init_backbone(backbone, cfg))
        if notes is not None:
            notes.append(note)
    head = build_head(cfg, num_identities, distributed=ctx.distributed, world_size=ctx.world_size).to(device)
    weight_generator = (MomentumEncoder(backbone, momentum=cfg.generator_momentum, bn_splits=cfg.bn_splits,
                                        shuffle_bn=cfg.shuffle_bn and ctx.distributed)
                        if head_spec(cfg.head).needs_references else None)
    forward_model = backbone
    if ctx.distributed:
        # gradients as views of DDP's buckets: one copy of the gradients instead of two
        forward_model = nn.parallel.DistributedDataParallel(
            backbone, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    if cfg.compile:
        forward_model = torch.compile(forward_model)
    optimizer = build_optimizer(cfg, backbone, head)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(cfg, s, steps_per_epoch, total_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16" and device.type == "cuda")
    update = TrainStep(backbone, head, optimizer, weight_generator, amp=cfg.amp, grad_clip=cfg.grad_clip,
                     scaler=scaler, scheduler=scheduler, forward_model=forward_model)
    return TrainingParts(backbone, forward_model, weight_generator, head, optimizer, scheduler, scaler, update)
