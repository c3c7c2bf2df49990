"""PartialFC: margin softmax against a sampled subset of class centres (insightface's method).

Each step keeps every class present in the batch (positives) and fills up to
`ceil(sample_rate * N)` centres with uniformly drawn negatives. Only the sampled rows take part in
the loss, so only they may change in the optimiser step: the sampled rows are gathered into a
small parameter `sub_weight` (the one the optimiser sees) together with their rows of optimiser
state (e.g. SGD's momentum buffer); after the step both are scattered back. `bind_optimizer`
registers that gather/scatter as step hooks of the one optimiser that holds `sub_weight` (nothing is
registered process-wide); a step by an optimiser that was never bound is caught at the next
forward, which raises instead of silently losing the update. Rows not sampled keep
their weight *and* their momentum, exactly like insightface's single-GPU Partial FC. The full
matrices live in buffers `weight` (N, d) and `state_<name>` (N, d), so a checkpoint holds them.

Sampling runs on the head's device (a device generator; nothing goes through the host but the
count of distinct labels, which `torch.unique` reads as insightface's code does). The sampled rows
are moved into the bound optimiser in the forward, so a GradScaler unscales and inf-checks their
gradient like every other parameter's, also when a batch holds more classes than `num_sample`.

With `distributed=True` (under torchrun) the centres are sharded over ranks like insightface's
Partial FC v2: each rank holds N/W rows of `weight` and of the optimiser-state buffers, the
embeddings and labels of the global batch are all-gathered, and the softmax is computed across
ranks. As in Partial FC v2, each rank samples within its own rows: every positive of the global
batch that lives there, filled up to `ceil(sample_rate * rows)` with the highest-scoring other rows
(top-k over the shard only). The scores are one uniform draw over all N classes from a generator
that every rank holds in the same state, so a checkpoint continues exactly at any world size; one
process is the one-shard case of the same rule, and with several ranks the sampled set differs
from one process's in how many rows each shard contributes (its own share, not its part of one
global top-k).
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn

from dcq.heads.base import Head, check_labels
from dcq.heads.full_fc import gather_batch, margin_softmax
from dcq.heads.sharding import ClassShard, add_state_dict_sharding, init_centres
from dcq.heads.margins import make_margin


class PartialFC(Head):
    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 0.1,
        scale: float = 64.0,
        margin: float = 0.5,
        margin_type: str = "arcface",
        seed: int = 0,
        distributed: bool = False,
    ):
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)
        self.sample_rate = float(sample_rate)
        self.margin = make_margin(margin_type, scale, margin)
        self.shard = ClassShard.for_this_rank(self.num_classes, distributed)
        self.num_sample = max(1, math.ceil(self.sample_rate * self.shard.rows))  # of this rank's rows
        self.register_buffer("weight", init_centres(self.num_classes, self.embedding_size, self.shard.start,
                                                    self.shard.stop, seed))
        self.sub_weight = nn.Parameter(self.weight[: min(self.num_sample, self.shard.rows)].clone())
        self._seed = int(seed)
        self.sampling_rng = torch.Generator().manual_seed(self._seed)
        self._pending: torch.Tensor | None = None  # local rows whose sub_weight awaits an optimiser step
        self._hooks: list = []  # step hooks of the bound optimiser
        self._optimizer = None  # weak reference to the bound optimiser
        self._set_slot(self.sub_weight)
        self._register_state_dict_hook(_drop_sub_weight)
        self.register_load_state_dict_post_hook(_ignore_missing_sub_weight)
        add_state_dict_sharding(self, lambda name: name == "weight" or name.startswith("state_"))

    # -- sampling -------------------------------------------------------------------------------
    def _generator(self, device: torch.device) -> torch.Generator:
        """The sampling generator on `device` (moved there once, its state kept when it can be)."""
        if self.sampling_rng.device != device:
            same_kind = self.sampling_rng.device.type == device.type
            self.sampling_rng = self._new_generator(device, self.sampling_rng.get_state() if same_kind else None)
        return self.sampling_rng

    def _new_generator(self, device: torch.device, state: torch.Tensor | None) -> torch.Generator:
        """A generator on `device` in `state`, or seeded from the head's seed where there is none or it
        belongs to another kind of device (a CPU state cannot continue on a GPU)."""
        generator = torch.Generator(device=device).manual_seed(self._seed)
        if state is not None:
            try:
                generator.set_state(state)
            except RuntimeError:
                generator.manual_seed(self._seed)
        return generator

    def sample(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted rows of this rank's shard to use this step (its positives + random negatives) and
        each row's target column among them (-1 where the class lives on another rank).

        `labels` is the global batch, on the head's device; everything stays there.
        """
        local = self.shard.local_targets(labels)  # row in this shard, -1 elsewhere
        positives = torch.unique(local, sorted=True)
        if self.shard.sharded:
            positives = positives[positives >= 0]
        if self.num_sample >= self.shard.rows:
            index = torch.arange(self.shard.rows, device=labels.device)
        elif positives.numel() >= self.num_sample:
            index = positives
        else:
            # every rank draws the scores of all N classes (one generator state for every world size:
            # a checkpoint resumes exactly at any world size) and ranks only its own rows
            score = torch.rand(self.num_classes, generator=self._generator(labels.device), device=labels.device)
            score = score[self.shard.start : self.shard.stop]
            score[positives] = 2.0  # positives always win
            index = torch.topk(score, self.num_sample).indices.sort().values
        found = torch.searchsorted(index, local.clamp_min(0))
        return index, torch.where(local >= 0, found, local)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, key: torch.Tensor | None = None):
        labels = check_labels(labels, embeddings.shape[0], self.num_classes).to(embeddings.device)
        self._check_written_back()
        if self.shard.sharded:
            embeddings, labels = gather_batch(embeddings, labels)
        index, targets = self.sample(labels)
        rows = self.weight[index]
        if rows.shape == self.sub_weight.shape:
            with torch.no_grad():
                self.sub_weight.copy_(rows)
        else:  # more positives than num_sample: a larger parameter for this step
            self.sub_weight = nn.Parameter(rows.clone())
        self._pending = index
        optimizer = self._optimizer() if self._optimizer is not None else None
        if optimizer is not None:
            # now, not in the step: GradScaler's unscale_ and inf check must see this step's parameter
            self._load_rows_into(optimizer)
        return margin_softmax(self.margin, embeddings, self.sub_weight, targets, sharded=self.shard.sharded)

    # -- optimiser plumbing ---------------------------------------------------------------------
    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Hook the gather/scatter of the sampled rows into `optimizer`'s steps (it must hold this
        head's `sub_weight`); binding another optimiser later replaces the earlier binding."""
        if not self._holds(optimizer):
            raise ValueError("PartialFC.bind_optimizer: the optimizer does not hold this head's sub_weight")
        for handle in self._hooks:
            handle.remove()
        self._optimizer = weakref.ref(optimizer)
        self._hooks = [optimizer.register_step_post_hook(lambda opt, args, kwargs: self._after_step(opt))]

    @torch.no_grad()
    def _check_written_back(self) -> None:
        """An optimiser that was never bound stepped `sub_weight`: its update would be lost."""
        if self._pending is None or self._hooks or self.sub_weight.shape[0] != self._pending.numel():
            return
        if not torch.equal(self.sub_weight, self.weight[self._pending]):
            raise ValueError("PartialFC: an optimiser stepped the sampled class centres without writing them back; "
                             "call head.bind_optimizer(optimizer) once after building the optimiser")

    def _holds(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether `optimizer` steps this head's sampled rows (the tensor it holds is `_slot`)."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if any(p is self._slot for p in params):
            return True
        if any(p is self.sub_weight for p in params):  # built after a forward that enlarged sub_weight
            self._set_slot(self.sub_weight)
            return True
        return False

    def _set_slot(self, param: nn.Parameter) -> None:
        """Remember which tensor the optimiser holds, without registering it as a parameter."""
        self.__dict__["_slot"] = param

    def _state_rows(self, name: str) -> torch.Tensor:
        buf_name = f"state_{name}"
        if not hasattr(self, buf_name):
            self.register_buffer(buf_name, torch.zeros_like(self.weight))
        return getattr(self, buf_name)

    @torch.no_grad()
    def _load_rows_into(self, optimizer) -> None:
        """Point `optimizer` at this step's `sub_weight` with the sampled rows of its state (momentum)."""
        if self._pending is None or not self._holds(optimizer):
            return
        for group in optimizer.param_groups:  # point the optimiser at this step's parameter
            group["params"] = [self.sub_weight if p is self._slot else p for p in group["params"]]
        old_state = optimizer.state.pop(self._slot, {})
        self._set_slot(self.sub_weight)
        state = {}
        for name, value in old_state.items():
            if self._is_row_state(value):
                continue  # per-row tensors are re-gathered below
            state[name] = value
        for name in self._row_state_names():
            state[name] = self._state_rows(name)[self._pending].clone()
        if state:
            optimizer.state[self.sub_weight] = state

    @torch.no_grad()
    def _after_step(self, optimizer) -> None:
        if self._pending is None or not self._holds(optimizer):
            return
        index = self._pending
        self.weight[index] = self.sub_weight.detach()
        state = optimizer.state.get(self.sub_weight, {})
        for name, value in state.items():
            if self._is_row_state(value):
                self._state_rows(name)[index] = value
        self._pending = None

    def _is_row_state(self, value) -> bool:
        """Optimiser state with one row per sampled class (momentum, Adam moments), not scalars."""
        return torch.is_tensor(value) and value.ndim == 2 and value.shape[1] == self.embedding_size

    def _row_state_names(self) -> list[str]:
        return [n[len("state_"):] for n, _ in self.named_buffers() if n.startswith("state_")]

    # -- checkpoint state -------------------------------------------------------------------------
    def get_extra_state(self):
        return {"generator": self.sampling_rng.get_state()}  # the key checkpoints have always used

    def set_extra_state(self, state) -> None:
        """The generator on the head's device; a state saved on another kind of device (a CPU run
        resumed on a GPU) cannot continue there, and the stream restarts from the seed instead."""
        self.sampling_rng = self._new_generator(self.weight.device, state["generator"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in list(state_dict):  # create the per-row optimiser-state buffers before loading
            if key.startswith(prefix + "state_"):
                self._state_rows(key[len(prefix) + len("state_"):])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"sample_rate={self.sample_rate}, num_sample={self.num_sample}, margin={self.margin}"
        )


def _drop_sub_weight(module, state_dict, prefix, local_metadata):
    """`sub_weight` is a per-step view of `weight`; it changes shape and is not model state."""
    state_dict.pop(prefix + "sub_weight", None)


def _ignore_missing_sub_weight(module, incompatible_keys):
    for key in list(incompatible_keys.missing_keys):
        if key.endswith("sub_weight"):
            incompatible_keys.missing_keys.remove(key)
