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
5. head loss, backward through the GradScaler, gradient clipping of the feature extractor;
6. `loss_check(stats)` with the step's statistics as one device tensor, ``[loss, head accuracy,
   gradient norm]`` (the norm before clipping; still multiplied by the GradScaler's scale when
   fp16 runs without clipping; NaN without gradients): the trainer reads it back in one host
   synchronisation, and raising there (its NaN guard) stops the step before anything is updated;
   its return value is `StepOutput.checked`;
7. optimiser step, scaler update, schedule step.

Written for a GPU: labels are checked on the host before their copy, nothing in the step reads a
device value back except what `loss_check` chooses to read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dcq.data.transforms import normalize
from dcq.heads.base import Head, HeadOutput, check_labels
from dcq.momentum import MomentumEncoder
from dcq.train.divergence import total_norm

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepOutput:
    head: HeadOutput  # the head's output of this step
    loss: torch.Tensor  # the loss that was back-propagated
    lr: float  # learning rate of the optimiser step (first param group)
    checked: Any = None  # what `loss_check` returned (None without one)


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

    def keys(self, references: torch.Tensor, seed: int | None = None, prepare=None) -> torch.Tensor | None:
        """The weight generator's embeddings of (B, k, ...) references: (B, d), or (B, k, d) for k > 1.

        `seed`: of the cross-rank shuffle-BN permutation (equal on every rank; see `MomentumEncoder`);
        `prepare`: maps the images to the network's input after any cross-rank gather (uint8 -> float)."""
        if self.weight_generator is None:
            return None
        b, k = references.shape[:2]
        with self._autocast(references.device):
            keys = self.weight_generator(references.flatten(0, 1), seed=seed, prepare=prepare).float()
        return keys.view(b, k, -1) if k > 1 else keys.view(b, -1)

    def __call__(self, samples: torch.Tensor, references: torch.Tensor | None, labels: torch.Tensor,
                 loss_check: Callable[[torch.Tensor], Any] | None = None,
                 device: torch.device | None = None, key_seed: int | None = None) -> StepOutput:
        check_labels(labels, labels.shape[0], getattr(self.head, "num_classes", None))  # on the host: no sync
        if device is not None:
            samples = samples.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
        keys = None
        if self.weight_generator is not None:
            if device is not None:
                references = references.to(device, non_blocking=True)
            # uint8 from the loader (a quarter of float32's bytes) is mapped to [-1, 1] on the device;
            # under shuffle-BN the weight generator gathers the uint8 images first, then maps them
            prepare = normalize if references.dtype == torch.uint8 else None
        if samples.dtype == torch.uint8:
            samples = normalize(samples)
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        if self.weight_generator is not None:
            self.weight_generator.update(self.feature_extractor)
            keys = self.keys(references, seed=key_seed, prepare=prepare)
        with self._autocast(samples.device):
            embeddings = self.forward_model(samples)
        out = self.head(embeddings, labels, key=keys)
        loss = out.loss
        self.scaler.scale(loss).backward()
        lr = float(self.optimizer.param_groups[0]["lr"]) if self.optimizer is not None else 0.0
        norm = None
        if self.optimizer is not None and self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            norm = nn.utils.clip_grad_norm_(self.feature_extractor.parameters(), self.grad_clip)
        checked = None
        if loss_check is not None:
            if norm is None:
                norm = gradient_norm(self.feature_extractor.parameters(), loss)
            stats = torch.stack([loss.detach().float(), out.accuracy_tensor().to(loss.device),
                                 norm.detach().float().to(loss.device)])
            checked = loss_check(stats)
        if self.optimizer is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        return StepOutput(head=out, loss=loss, lr=lr, checked=checked)


def gradient_norm(parameters, like: torch.Tensor) -> torch.Tensor:
    """Total 2-norm of the gradients on the device (NaN when there are none), without a host sync."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return total_norm(grads) if grads else torch.full((), float("nan"), device=like.device)
