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

from dcq.errors import DcqError
from dcq.heads import DynamicClassQueue, FullFC, PartialFC
from dcq.heads.base import Head
from dcq.models import get_backbone
from dcq.momentum import MomentumEncoder
from dcq.train.config import TrainConfig
from dcq.train.step import TrainStep


def resolve_queue_size(cfg: TrainConfig, num_identities: int) -> int:
    """DCQ's queue length: `queue_size` entries, or `queue_fraction` of the identities."""
    size = cfg.queue_size if cfg.queue_size else max(1, round(cfg.queue_fraction * num_identities))
    if size > num_identities:
        raise DcqError(
            f"queue_size={size} is larger than the number of identities ({num_identities}); "
            "a queue holds negatives of other identities, so use at most that many (the paper uses ~10%)"
        )
    return size


IN_BATCH_MIN_BATCHES = 2.0  # "auto" in-batch negatives: on when the queue holds this many global batches


def uses_in_batch_negatives(cfg: TrainConfig, queue_size: int, world_size: int = 1) -> bool:
    """`in_batch_negatives` as set, or for "auto": whether the queue spans at least
    IN_BATCH_MIN_BATCHES global batches. A queue that short holds the last batch or two, as fresh
    as the batch itself, and the batch's weights add nothing it lacks; a queue of many batches holds
    weights from generators up to many steps old, and the batch's own weights are the freshest
    negatives there are (docs/results.md, "One in-batch rule")."""
    if cfg.in_batch_negatives != "auto":
        return bool(cfg.in_batch_negatives)
    return queue_size >= IN_BATCH_MIN_BATCHES * cfg.batch_size * world_size


def build_head(cfg: TrainConfig, num_identities: int, distributed: bool = False, world_size: int = 1) -> Head:
    """The configured head; `distributed`: DCQ all-gathers its enqueued keys so every rank holds the
    same queue, FC and Partial FC shard their class centres over the ranks."""
    if cfg.head == "dcq":
        queue_size = resolve_queue_size(cfg, num_identities)
        return DynamicClassQueue(
            embedding_size=cfg.embedding_size, queue_size=queue_size,
            scale=cfg.scale, margin=cfg.margin, margin_type=cfg.margin_type,
            in_batch_negatives=uses_in_batch_negatives(cfg, queue_size, world_size), dedup=cfg.dedup,
            distributed=distributed,
        )
    if cfg.head == "fc":
        return FullFC(cfg.embedding_size, num_identities, scale=cfg.scale, margin=cfg.margin,
                      margin_type=cfg.margin_type, seed=cfg.seed, distributed=distributed)
    return PartialFC(cfg.embedding_size, num_identities, sample_rate=cfg.sample_rate, scale=cfg.scale,
                     margin=cfg.margin, margin_type=cfg.margin_type, seed=cfg.seed, distributed=distributed)


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
class Model:
    """The trained parts of one run and what updates them."""

    feature_extractor: nn.Module  # the backbone trained by SGD
    forward_model: nn.Module  # the feature extractor, wrapped in DDP when distributed
    weight_generator: MomentumEncoder | None  # DCQ only: the EMA copy that embeds references
    head: Head
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    step: TrainStep

    def eval_encoder(self) -> nn.Module:
        """What evaluation embeds with: the weight generator when there is one (as DCQ evaluates)."""
        return self.weight_generator.encoder if self.weight_generator is not None else self.feature_extractor


def build_model(cfg: TrainConfig, num_identities: int, ctx, steps_per_epoch: int, total_steps: int,
                resuming: bool = False, notes: list[str] | None = None) -> Model:
    """Build every trained part on `ctx.device` (`ctx`: `dcq.distributed` context). `init_from`
    starts the backbone (and so the weight generator, its copy) from a pretrained model, unless the
    run resumes from a checkpoint, whose weights win; what happened is appended to `notes`."""
    device = ctx.device
    backbone = get_backbone(cfg.backbone, embedding_size=cfg.embedding_size, image_size=cfg.image_size,
                            dropout=cfg.dropout).to(device)
    if cfg.channels_last and device.type == "cuda":
        backbone = backbone.to(memory_format=torch.channels_last)  # the weight generator copies it so
    if cfg.init_from:  # before the weight generator copies the backbone
        from dcq.convert import init_backbone

        note = (f"init_from={cfg.init_from} not read: a resumed run starts from its checkpoint" if resuming
                else init_backbone(backbone, cfg))
        if notes is not None:
            notes.append(note)
    head = build_head(cfg, num_identities, distributed=ctx.distributed, world_size=ctx.world_size).to(device)
    weight_generator = (MomentumEncoder(backbone, momentum=cfg.generator_momentum, bn_splits=cfg.bn_splits,
                                        shuffle_bn=cfg.shuffle_bn and ctx.distributed)
                        if head.needs_key else None)
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
    step = TrainStep(backbone, head, optimizer, weight_generator, amp=cfg.amp, grad_clip=cfg.grad_clip,
                     scaler=scaler, scheduler=scheduler, forward_model=forward_model)
    return Model(backbone, forward_model, weight_generator, head, optimizer, scheduler, scaler, step)
