"""The training state of a run: what a checkpoint holds, written and restored in one place.

Exact resume: a training checkpoint holds both encoders, the head (queue included), the optimiser
(sharded head rows gathered to all N rows), schedule, scaler, step, the sampler position inside the
epoch and every RNG state, so a resumed run continues exactly where the interrupted one stopped.
Files are written by `dcq.checkpoint.save_checkpoint` (atomic, with a checksum) into the names of
`dcq.train.rundir.RunFiles`.

Layout of a training checkpoint ``step_<step>.pt`` (plain containers, tensors and scalars, so the
restricted loader accepts it; ``format``, ``version`` and ``checksum`` are added by save_checkpoint):

    model: {backbone, embedding_size, image_size}
    feature_extractor: state_dict
    weight_generator: state_dict | None            (DCQ only)
    config: {...}                                  (TrainConfig keys; checkpoints before the 0.2
                                                    renames hold the old key names)
    threshold: float | None                        (verification threshold of the last evaluation)
    identity_names: list[str] | None               (image folders: folder name of each label)
    metrics: {<set>: {accuracy, ...}}              (last evaluation)
    step: int
    dataset: {path, images, identities}            (what --resume must train on)
    head: state_dict                               (all N rows, also when sharded over ranks)
    optimizer: state_dict                          (sharded head rows gathered to all N rows)
    scheduler, scaler: state_dicts
    epoch: int
    sampler: {epoch, position, world_size}         (position = items this rank consumed)
    rng: {torch, numpy: {keys, pos, has_gauss, cached}, python, cuda?}
    best_accuracy: float                           (-1 before the first evaluation)

An *export* (``final.pt``, ``best.pt``) holds only the entries down to ``dataset``: what
evaluation, embedding and ONNX export read.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dcq import distributed
from dcq.checkpoint import load_checkpoint, save_checkpoint
from dcq.errors import DcqError
from dcq.train import resume_check
from dcq.train.build import TrainingParts
from dcq.train.config import TrainConfig
from dcq.train.rundir import RunFiles, latest_checkpoint, prune_checkpoints


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Every RNG state of `capture_rng`, from host tensors (`TrainingState.resume` loads to the host).

    CUDA states are restored for the devices both machines have: a checkpoint written where more
    GPUs were visible restores the first ones, one written with fewer restores what it holds."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state.get("cuda") and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)


@dataclass
class Progress:
    """Where the run is, and what its evaluations found."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # items of this rank's epoch share consumed
    best_accuracy: float = -1.0
    threshold: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # the last evaluation, by set name


class TrainingState:
    """Writes and restores the checkpoints of one run (every rank calls `save`; rank 0 writes)."""

    def __init__(self, cfg: TrainConfig, model: TrainingParts, ctx, files: RunFiles, dataset_fingerprint: dict,
                 identity_names: list[str] | None):
        self.cfg = cfg
        self.model = model
        self.ctx = ctx
        self.files = files
        self.fingerprint = dataset_fingerprint
        self.identity_names = list(identity_names) if identity_names else None
        self.progress = Progress()
        self.saved_step: int | None = None  # the step of the newest training checkpoint of this run
        self.resumed_in_place: int | None = None  # the step, when resumed from this run's own folder

    # -- writing ------------------------------------------------------------------------------
    def payload(self, training: bool = True) -> dict[str, Any]:
        """The checkpoint dict (module docstring); `training=False`: an export."""
        cfg, m, p = self.cfg, self.model, self.progress
        payload = {
            "model": {"backbone": cfg.backbone, "embedding_size": cfg.embedding_size, "image_size": cfg.image_size},
            "feature_extractor": m.feature_extractor.state_dict(),
            "weight_generator": m.weight_generator.encoder.state_dict() if m.weight_generator else None,
            "config": cfg.to_dict(),
            "threshold": p.threshold,
            "identity_names": self.identity_names,
            "metrics": p.metrics,
            "step": p.step,
            "dataset": self.fingerprint,
        }
        if training:
            payload.update({
                "head": m.head.state_dict(),  # full N rows: sharded heads gather (every rank calls this)
                "optimizer": self._optimizer_state(),
                "scheduler": m.scheduler.state_dict(),
                "scaler": m.scaler.state_dict(),
                "epoch": p.epoch,
                "sampler": {"epoch": p.epoch, "position": p.position, "world_size": self.ctx.world_size},
                "rng": capture_rng(),
                "best_accuracy": p.best_accuracy,
            })
        return payload

    def save(self) -> Path | None:
        """A training checkpoint of the current step, then prune to `keep_last`; every rank must call
        it (sharded heads gather), rank 0 writes."""
        payload = self.payload()
        self.saved_step = self.progress.step  # on every rank, so all ranks take the same save decisions
        if not self.ctx.is_main:
            return None
        path = save_checkpoint(self.files.checkpoint(self.progress.step), payload)
        prune_checkpoints(self.files.root, self.cfg.keep_last)
        return path

    def export(self, path: Path) -> Path | None:
        """An export (encoders, threshold, config) at `path`, written by rank 0."""
        return save_checkpoint(path, self.payload(training=False)) if self.ctx.is_main else None

    def _sharded_state_ids(self) -> list[int]:
        """Positions, in the optimiser's state_dict, of the head parameters sharded over ranks."""
        sharded = {id(p) for p in self.model.head.sharded_parameters()}
        params = [p for group in self.model.optimizer.param_groups for p in group["params"]]
        return [i for i, p in enumerate(params) if id(p) in sharded]

    def _optimizer_state(self) -> dict[str, Any]:
        """The optimiser's state_dict with the state of sharded head rows gathered to all N rows."""
        state = self.model.optimizer.state_dict()
        for i in self._sharded_state_ids():
            own = state["state"].get(i, {})  # the live dict: build a new one, never write into it
            state["state"][i] = {name: self.model.head.gather_rows(v) if torch.is_tensor(v) and v.ndim else v
                                 for name, v in sorted(own.items())}
        return state

    # -- restoring ----------------------------------------------------------------------------
    def locate(self, resume: str) -> Path | None:
        """The checkpoint `--resume` means: a path, "latest" (the newest here; an error when there is
        none) or "auto" (the newest here, or None to start fresh; rank 0 decides for all ranks)."""
        if resume == "auto":  # an elastic restart
            newest = latest_checkpoint(self.files.root) if self.ctx.is_main else None
            newest = distributed.broadcast_object(str(newest) if newest else None)
            return Path(newest) if newest else None
        if resume != "latest":
            return Path(resume)
        path = latest_checkpoint(self.files.root)
        if path is None:
            raise DcqError(f"--resume: no step_*.pt checkpoint in {self.files.root}; train without --resume first")
        return path

    def resume(self, resume: str) -> list[str]:
        """Restore everything from the checkpoint `resume` names; returns lines worth logging."""
        path = self.locate(resume)
        if path is None:
            return []
        m = self.model
        # To the host first: RNG states must stay there, and load_state_dict copies each tensor to
        # the device of the parameter or buffer it fills (sharded heads keep only their rows).
        ckpt = load_checkpoint(path, map_location="cpu")
        if "optimizer" not in ckpt:
            raise DcqError(f"{path} is an export without training state; resume from a step_*.pt checkpoint")
        saved = resume_check.saved_config(ckpt)
        cfg_values = self.cfg.to_dict()
        notes = resume_check.check_compatible(path, ckpt, cfg_values, self.fingerprint)
        try:
            m.feature_extractor.load_state_dict(ckpt["feature_extractor"])
            if m.weight_generator is not None:
                m.weight_generator.encoder.load_state_dict(ckpt["weight_generator"])
            m.head.load_state_dict(ckpt["head"])  # sharded heads keep their rows of the full tensors
            optimizer = ckpt["optimizer"]
            for i in self._sharded_state_ids():
                optimizer["state"][i] = {name: m.head.local_rows(v) if torch.is_tensor(v) else v
                                         for name, v in optimizer["state"].get(i, {}).items()}
            m.optimizer.load_state_dict(optimizer)
            m.scheduler.load_state_dict(ckpt["scheduler"])
            m.scaler.load_state_dict(ckpt["scaler"])
            p = self.progress
            p.step = int(ckpt["step"])
            p.epoch = int(ckpt["sampler"]["epoch"])
            # A checkpoint written at another world size: ranks read interleaved shares of the epoch, so
            # W ranks at `position` have consumed the first position * W items of the epoch.
            saved_world = int(ckpt["sampler"].get("world_size", 1))
            p.position = int(ckpt["sampler"]["position"]) * saved_world // self.ctx.world_size
            restore_rng(ckpt["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DcqError(f"--resume {path}: the checkpoint's state does not fit this config ({first[:160]}); "
                           "resume with the config it was written with") from None
        changes = resume_check.apply_hyperparameters(m.optimizer, m.scheduler, cfg_values, saved)
        p.best_accuracy = float(ckpt.get("best_accuracy", -1.0))
        p.threshold = ckpt.get("threshold")
        p.metrics = ckpt.get("metrics") or {}
        self.saved_step = p.step
        if path.parent.resolve() == self.files.root.resolve():
            self.resumed_in_place = p.step
        notes.append(f"resumed from {path} at step {p.step} (epoch {p.epoch}, item {p.position})")
        if changes:
            notes.append("resume applies changed optimiser settings: " + ", ".join(changes))
        return notes
