"""The training step, defined once: `dcq train`, `dcq bench` and every benchmark run this code.

A `TrainStep` owns the three parts of the model and what updates them:

- the **feature extractor** (trained; embeds the sample images),
- the **weight generator** (`MomentumEncoder`, an EMA copy of the feature extractor; embeds the
  reference images into class weights; only when the head needs keys, i.e. DCQ),
- the **head** (DCQ, FC or Partial FC, all called ``head(embeddings, labels, key=key)``),

plus the optimiser, the GradScaler, gradient clipping and (optionally) the LR schedule. One call:

0. move the batch to the device (non-blocking; from pinned memory on CUDA) and map uint8 images to
   [-1, 1] there (``dcq.data.transforms.normalize``);
1. zero the gradients;
2. EMA update of the weight generator towards the feature extractor;
3. keys: the weight generator's embeddings of the references (B, k, ...) -> (B, d), or (B, k, d)
   when k > 1 (no gradient);
4. embeddings of the samples (the feature extractor, through its DDP wrapper when distributed);
5. head loss; `loss_check(loss)` rejects a non-finite loss by raising (the trainer's NaN guard)
   before anything is updated, and returns the value to log (the trainer's: the global batch's);
6. backward through the GradScaler, gradient clipping of the feature extractor, optimiser step,
   scaler update, schedule step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from dcq.data.transforms import normalize
from dcq.heads.base import Head, HeadOutput
from dcq.momentum import MomentumEncoder

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepOutput:
    head: HeadOutput  # the head's output of this step
    loss: torch.Tensor  # the loss that was back-propagated
    lr: float  # learning rate of the optimiser step (first param group)
    checked_loss: float | None = None  # what `loss_check` returned (None without one)


class TrainStep:
    def __init__(
        self,
        feature_extractor: nn.Module,
        head: Head,
        optimizer: torch.optim.Optimizer | None,
        weight_generator: MomentumEncoder | None = None,
        *,
        amp: str = "none",
        grad_clip: float = 0.0,
        scaler: torch.amp.GradScaler | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        forward_model: nn.Module | None = None,
    ):
        if head.needs_key and weight_generator is None:
            raise ValueError(f"{type(head).__name__} needs keys: give the step a weight generator")
        self.feature_extractor = feature_extractor
        self.weight_generator = weight_generator if head.needs_key else None
        self.head = head
        self.optimizer = optimizer
        self.amp_dtype = AMP_DTYPES[amp]
        self.grad_clip = float(grad_clip)
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler("cuda", enabled=False)
        self.scheduler = scheduler
        self.forward_model = forward_model if forward_model is not None else feature_extractor

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.feature_extractor, self.weight_generator, self.head) if m is not None]

    def train(self) -> None:
        for module in self.modules():
            module.train()

    def _autocast(self, device: torch.device):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.amp_dtype)

    def keys(self, references: torch.Tensor, seed: int | None = None) -> torch.Tensor | None:
        """The weight generator's embeddings of (B, k, ...) references: (B, d), or (B, k, d) for k > 1.

        `seed`: of the cross-rank shuffle-BN permutation (equal on every rank; see `MomentumEncoder`)."""
        if self.weight_generator is None:
            return None
        b, k = references.shape[:2]
        with self._autocast(references.device):
            keys = self.weight_generator(references.flatten(0, 1), seed=seed).float()
        return keys.view(b, k, -1) if k > 1 else keys.view(b, -1)

    def __call__(self, samples: torch.Tensor, references: torch.Tensor | None, labels: torch.Tensor,
                 loss_check: Callable[[torch.Tensor], float] | None = None,
                 device: torch.device | None = None, key_seed: int | None = None) -> StepOutput:
        if device is not None:
            samples = samples.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if references is not None and self.weight_generator is not None:
                references = references.to(device, non_blocking=True)
        # uint8 images from the loader (a quarter of float32's bytes) are mapped to [-1, 1] here, after the copy
        if samples.dtype == torch.uint8:
            samples = normalize(samples)
        if references is not None and self.weight_generator is not None and references.dtype == torch.uint8:
            references = normalize(references)
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        keys = None
        if self.weight_generator is not None:
            self.weight_generator.update(self.feature_extractor)
            keys = self.keys(references, seed=key_seed)
        with self._autocast(samples.device):
            embeddings = self.forward_model(samples)
        out = self.head(embeddings, labels, key=keys)
        loss = out.loss
        checked = None if loss_check is None else loss_check(loss)
        self.scaler.scale(loss).backward()
        lr = float(self.optimizer.param_groups[0]["lr"]) if self.optimizer is not None else 0.0
        if self.optimizer is not None:
            if self.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.feature_extractor.parameters(), self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        return StepOutput(head=out, loss=loss, lr=lr, checked_loss=checked)
