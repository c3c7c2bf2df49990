"""The training loop: one loop for every head.

Each step is `dcq.train.step.TrainStep` (the one definition of a training step, shared with `dcq
bench` and the benchmarks). The loop never asks which head it runs: the step calls
``head(embeddings, labels, key=key)`` and the loop logs the loss, accuracy and ``head.metrics()``.

Exact resume: a checkpoint holds both encoders, the head (queue included), optimiser, schedule,
step, the sampler position inside the epoch and every RNG state; augmentation randomness is seeded
per item from (seed, epoch, position), so it does not depend on which DataLoader worker (or which
incarnation of the process) decodes an item.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from dcq import distributed
from dcq import distributed as dist_helpers
from dcq.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from dcq.errors import DcqError
from dcq.heads import DynamicClassQueue, FullFC, PartialFC
from dcq.heads.base import Head
from dcq.models import get_backbone
from dcq.momentum import MomentumEncoder
from dcq.resources import set_threads
from dcq.train import resume_check
from dcq.train.config import TrainConfig
from dcq.train.divergence import DivergenceMonitor, TrainingDiverged, grad_norm
from dcq.train.memory_check import check_fits
from dcq.train.rundir import RunFolder, prune_checkpoints
from dcq.train.step import TrainStep

NAN_INJECTION_ENV = "DCQ_INJECT_NAN_STEP"  # fault-injection hook for tests: poison the loss at this step
__all__ = ["Trainer", "TrainingDiverged", "train"]


# -- data plumbing ----------------------------------------------------------------------------------
class _PositionedSampler(Sampler):
    """Wraps PairSampler: yields (sample, references, item_seed) from a start position within the epoch."""

    def __init__(self, pair_sampler, seed: int):
        self.pairs = pair_sampler
        self.seed = int(seed)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)
        self.pairs.set_epoch(epoch, start=start)

    def __len__(self) -> int:
        return len(self.pairs)  # PairSampler already counts from `start`

    def __iter__(self):
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        for offset, (sample, references) in enumerate(self.pairs):
            yield sample, tuple(references), (base + self.start + offset) % (2**63 - 1)


class _SeededItems(Dataset):
    """Seeds torch's RNG per item so augmentation is a function of the item, not of the worker."""

    def __init__(self, pairs_dataset):
        self.inner = pairs_dataset

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, item):
        sample, references, item_seed = item
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
            torch.manual_seed(item_seed)
            return self.inner[(sample, references)]


# -- construction -----------------------------------------------------------------------------------
def resolve_queue_size(cfg: TrainConfig, num_identities: int) -> int:
    size = cfg.queue_size if cfg.queue_size else max(1, round(cfg.queue_fraction * num_identities))
    if size > num_identities:
        raise DcqError(
            f"queue_size={size} is larger than the number of identities ({num_identities}); "
            "a queue holds negatives of other identities, so use at most that many (the paper uses ~10%)"
        )
    return size


def build_head(cfg: TrainConfig, num_identities: int, distributed: bool = False) -> Head:
    """The configured head; `distributed`: DCQ all-gathers its enqueued keys so every rank holds the
    same queue, FC and Partial FC shard their class centres over the ranks."""
    gather = dist_helpers.all_gather_cat if distributed else None
    if cfg.head == "dcq":
        return DynamicClassQueue(
            embedding_size=cfg.embedding_size, queue_size=resolve_queue_size(cfg, num_identities),
            scale=cfg.scale, margin=cfg.margin, margin_type=cfg.margin_type,
            in_batch_negatives=cfg.in_batch_negatives, dedup=cfg.dedup, gather=gather,
        )
    if cfg.head == "fc":
        return FullFC(cfg.embedding_size, num_identities, scale=cfg.scale, margin=cfg.margin,
                      margin_type=cfg.margin_type, seed=cfg.seed, distributed=distributed)
    return PartialFC(cfg.embedding_size, num_identities, sample_rate=cfg.sample_rate, scale=cfg.scale,
                     margin=cfg.margin, margin_type=cfg.margin_type, seed=cfg.seed, distributed=distributed)


def build_optimizer(cfg: TrainConfig, backbone: nn.Module, head: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in list(backbone.parameters()) + list(head.parameters()) if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


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
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class StepRecord:
    step: int
    epoch: int
    loss: float
    accuracy: float
    lr: float


class Trainer:
    """Builds everything from a TrainConfig and runs it; `run()` returns the final summary."""

    def __init__(self, cfg: TrainConfig, resume: str | None = None, log_fn=None, overwrite: bool = False):
        from dcq.data import PairSampler, open_dataset

        self.cfg = cfg
        self.ctx = distributed.setup(cfg.device, timeout=cfg.dist_timeout)
        self.device = self.ctx.device
        self.out = Path(cfg.output)
        self._log_fn = log_fn
        self._notes: list[str] = []  # logged once the run folder is claimed
        if cfg.threads:
            used = set_threads(cfg.threads)
            if used != cfg.threads:
                self._notes.append(f"threads={cfg.threads} is more than the {used} CPUs here; using {used}")
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
            if self.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        random.seed(cfg.seed)

        if cfg.amp == "fp16" and self.device.type != "cuda":
            raise DcqError("amp=fp16 needs CUDA; on CPU use amp=bf16 or amp=none")
        if not cfg.train_data:
            raise DcqError("config: train_data is empty; set it to a .rec file, a folder with train.rec, "
                           "or an image folder")
        for bin_path in cfg.eval_bins:  # found now, not at the first evaluation hours later
            if not Path(bin_path).is_file():
                raise DcqError(f"config: eval_bins entry {bin_path} does not exist; fix the path or remove it")
        if resume and resume not in ("latest", "auto") and not Path(resume).is_file():
            raise DcqError(f"--resume {resume}: checkpoint not found")
        self.source = open_dataset(cfg.train_data)
        n_images, n_ids = len(self.source), int(self.source.num_identities)
        if n_images == 0 or n_ids == 0:
            raise DcqError(f"training set {cfg.train_data} is empty")
        if cfg.head == "dcq" and n_ids < 2:
            raise DcqError(f"training set {cfg.train_data} has {n_ids} identity; DCQ needs at least 2")
        labels = getattr(self.source, "groups", None) or np.asarray(self.source.labels)  # .rec: cached
        pairs = PairSampler(labels, mode=cfg.sampling, num_references=cfg.references,
                            seed=cfg.seed, rank=self.ctx.rank, world_size=self.ctx.world_size)
        if pairs.epoch_length < cfg.batch_size:
            raise DcqError(
                f"batch_size={cfg.batch_size} is larger than the {pairs.epoch_length} images per epoch this "
                f"process reads from {cfg.train_data}; lower batch_size or use more data"
            )
        self.sampler = _PositionedSampler(pairs, cfg.seed)
        self.fingerprint = resume_check.dataset_fingerprint(cfg.train_data, self.source)
        queue_size = resolve_queue_size(cfg, n_ids) if cfg.head == "dcq" else None
        check_fits(cfg, n_ids, queue_size, self.device)
        # Claim the output folder (lock, no mixing with an earlier run) before anything is written.
        self.run_folder = RunFolder(self.out) if self.ctx.is_main else None
        if self.run_folder is not None:
            self.run_folder.claim(resume=bool(resume), overwrite=overwrite)
        try:
            self._build(cfg, pairs, resume)
        except BaseException:
            if self.run_folder is not None:
                self.run_folder.release(started=False)
            raise

    def _build(self, cfg: TrainConfig, pairs, resume: str | None) -> None:
        from dcq.data import PairDataset, TrainTransform

        n_ids = int(self.source.num_identities)
        transform = TrainTransform(cfg.image_size, flip=cfg.flip)
        dataset = PairDataset(self.source, transform, num_references=cfg.references, preload=cfg.preload,
                              on_bad_record=cfg.on_bad_record, progress=cfg.progress and _on_terminal())
        self.pair_dataset = dataset
        self.dataset = _SeededItems(dataset)
        self.steps_per_epoch = pairs.epoch_length // cfg.batch_size
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))

        self.backbone = get_backbone(cfg.backbone, embedding_size=cfg.embedding_size, image_size=cfg.image_size,
                                     dropout=cfg.dropout).to(self.device)
        if cfg.init_from:  # fine-tuning start, before the weight generator copies the backbone
            from dcq.convert import init_backbone  # --resume PATH/latest: the checkpoint's weights win, unread

            self._notes.append(init_backbone(self.backbone, cfg) if resume in (None, "auto") else
                               f"init_from={cfg.init_from} not read: a resumed run starts from its checkpoint")
        self.head = build_head(cfg, n_ids, distributed=self.ctx.distributed).to(self.device)
        self.generator = (MomentumEncoder(self.backbone, momentum=cfg.generator_momentum, bn_splits=cfg.bn_splits,
                                          shuffle_bn=cfg.shuffle_bn and self.ctx.distributed)
                          if self.head.needs_key else None)
        self.model = self.backbone
        if self.ctx.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                self.backbone, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = build_optimizer(cfg, self.backbone, self.head)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(cfg, s, self.steps_per_epoch, self.total_steps))
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16" and self.device.type == "cuda")
        self.train_step_fn = TrainStep(self.backbone, self.head, self.optimizer, self.generator, amp=cfg.amp,
                                       grad_clip=cfg.grad_clip, scaler=self.scaler, scheduler=self.scheduler,
                                       forward_model=self.model)

        self.step = 0
        self.epoch = 0
        self.position = 0  # items of this rank's epoch share consumed
        self.best_accuracy = -1.0
        self.last_metrics: dict[str, Any] = {}
        self.threshold: float | None = None
        self._eval_step = -1
        self.eval_history: list[dict[str, Any]] = []  # {"step", "<bin>": accuracy, ...} per evaluation
        self._saved_step: int | None = None
        self._resumed_in_place: int | None = None  # the step, when resumed from this run's own folder
        if resume:
            self._resume(resume)
        self.monitor = DivergenceMonitor(self.backbone.parameters(), self.out,
                                         lambda: latest_checkpoint(self.out) is not None)

    def close(self) -> None:
        """Unlock the output folder (also done when the process ends)."""
        if self.run_folder is not None:
            self.run_folder.release()

    # -- logging ------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if not self.ctx.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.out / "train.log", "a") as f:
            f.write(f"{stamp} {message}\n")
        if self._log_fn is not None:
            self._log_fn(message)

    # -- checkpoints --------------------------------------------------------------------------
    def _payload(self, training: bool = True) -> dict[str, Any]:
        cfg = self.cfg
        payload = {
            "model": {"backbone": cfg.backbone, "embedding_size": cfg.embedding_size, "image_size": cfg.image_size},
            "feature_extractor": self.backbone.state_dict(),
            "weight_generator": self.generator.encoder.state_dict() if self.generator else None,
            "config": cfg.to_dict(),
            "threshold": self.threshold,
            "identity_names": list(names) if (names := getattr(self.source, "identity_names", None)) else None,
            "metrics": self.last_metrics,
            "step": self.step,
            "dataset": self.fingerprint,
        }
        if training:
            payload.update({
                "head": self.head.state_dict(),  # full N rows: sharded heads gather (every rank calls this)
                "optimizer": self._optimizer_state(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "epoch": self.epoch,
                "sampler": {"epoch": self.epoch, "position": self.position, "world_size": self.ctx.world_size},
                "rng": capture_rng(),
                "best_accuracy": self.best_accuracy,
            })
        return payload

    def _sharded_state_ids(self) -> list[int]:
        """Positions, in the optimiser's state_dict, of the head parameters sharded over ranks."""
        sharded = {id(p) for p in self.head.sharded_parameters()}
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        return [i for i, p in enumerate(params) if id(p) in sharded]

    def _optimizer_state(self) -> dict[str, Any]:
        """The optimiser's state_dict with the state of sharded head rows gathered to all N rows."""
        state = self.optimizer.state_dict()
        for i in self._sharded_state_ids():
            own = state["state"].get(i, {})  # the live dict: build a new one, never write into it
            state["state"][i] = {name: self.head.gather_rows(v) if torch.is_tensor(v) and v.ndim else v
                                 for name, v in sorted(own.items())}
        return state

    def save(self) -> Path | None:
        """Write a training checkpoint (rank 0); every rank must call it, sharded heads gather."""
        payload = self._payload()
        self._saved_step = self.step  # on every rank, so all ranks take the same save decisions
        if not self.ctx.is_main:
            return None
        path = save_checkpoint(self.out / f"step_{self.step:08d}.pt", payload)
        prune_checkpoints(self.out, self.cfg.keep_last)
        return path

    def _resume(self, resume: str) -> None:
        if resume == "auto":  # an elastic restart: the newest checkpoint if any (rank 0 decides for all)
            newest = latest_checkpoint(self.out) if self.ctx.is_main else None
            newest = distributed.broadcast_object(str(newest) if newest else None)
            if newest is None:
                return
            resume = newest
        path = latest_checkpoint(self.out) if resume == "latest" else Path(resume)
        if path is None:
            raise DcqError(f"--resume: no step_*.pt checkpoint in {self.out}; train without --resume first")
        ckpt = load_checkpoint(path, map_location=self.device)
        if "optimizer" not in ckpt:
            raise DcqError(f"{path} is an export without training state; resume from a step_*.pt checkpoint")
        saved = resume_check.saved_config(ckpt)
        cfg_values = self.cfg.to_dict()
        self._notes += resume_check.check_compatible(path, ckpt, cfg_values, self.fingerprint)
        try:
            self.backbone.load_state_dict(ckpt["feature_extractor"])
            if self.generator is not None:
                self.generator.encoder.load_state_dict(ckpt["weight_generator"])
            self.head.load_state_dict(ckpt["head"])  # sharded heads keep their rows of the full tensors
            optimizer = ckpt["optimizer"]
            for i in self._sharded_state_ids():
                optimizer["state"][i] = {name: self.head.local_rows(v) if torch.is_tensor(v) else v
                                         for name, v in optimizer["state"].get(i, {}).items()}
            self.optimizer.load_state_dict(optimizer)
            self.scheduler.load_state_dict(ckpt["scheduler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DcqError(f"--resume {path}: the checkpoint's state does not fit this config ({first[:160]}); "
                           "resume with the config it was written with") from None
        changes = resume_check.apply_hyperparameters(self.optimizer, self.scheduler, cfg_values, saved)
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        self.epoch = int(ckpt["sampler"]["epoch"])
        # A checkpoint written at another world size: ranks read interleaved shares of the epoch, so
        # W ranks at `position` have consumed the first position * W items of the epoch.
        saved_world = int(ckpt["sampler"].get("world_size", 1))
        self.position = int(ckpt["sampler"]["position"]) * saved_world // self.ctx.world_size
        self.best_accuracy = float(ckpt.get("best_accuracy", -1.0))
        self.threshold = ckpt.get("threshold")
        self.last_metrics = ckpt.get("metrics") or {}
        restore_rng(ckpt["rng"])
        self._saved_step = self.step
        if path.parent.resolve() == self.out.resolve():
            self._resumed_in_place = self.step
        self._notes.append(f"resumed from {path} at step {self.step} (epoch {self.epoch}, item {self.position})")
        if changes:
            self._notes.append("resume applies changed optimiser settings: " + ", ".join(changes))

    # -- evaluation ---------------------------------------------------------------------------
    def eval_encoder(self) -> nn.Module:
        return self.generator.encoder if self.generator is not None else self.backbone

    def evaluate(self, writer=None) -> dict[str, Any]:
        self._eval_step = self.step
        if not self.cfg.eval_bins or not self.ctx.is_main:
            return {}
        from dcq.eval import evaluate_bin

        encoder = self.eval_encoder()
        was_training = encoder.training
        encoder.eval()
        results = {}
        try:
            for bin_path in self.cfg.eval_bins:
                name = Path(bin_path).stem
                results[name] = evaluate_bin(encoder, bin_path, self.cfg.image_size,
                                             batch_size=self.cfg.eval_batch_size, device=self.device)
                if writer is not None:
                    writer.add_scalar(f"eval/{name}/accuracy", results[name]["accuracy"], self.step)
                self.log(f"step {self.step} eval {name}: accuracy {results[name]['accuracy']:.4f} "
                         f"± {results[name]['accuracy_std']:.4f}")
        finally:
            encoder.train(was_training)
        first = results[Path(self.cfg.eval_bins[0]).stem]
        self.eval_history.append({"step": self.step, **{name: r["accuracy"] for name, r in results.items()}})
        self.threshold = float(first["threshold"])
        self.last_metrics = results
        if first["accuracy"] > self.best_accuracy:
            self.best_accuracy = float(first["accuracy"])
            save_checkpoint(self.out / "best.pt", self._payload(training=False))
        return results

    # -- the loop -----------------------------------------------------------------------------
    def _loader(self) -> DataLoader:
        workers = self.cfg.workers
        # A private generator: creating the iterator must not draw from the global RNG, or a resumed
        # run (which creates it mid-epoch) would shift every later random number.
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.epoch)
        return DataLoader(self.dataset, batch_size=self.cfg.batch_size, sampler=self.sampler, drop_last=True,
                          num_workers=workers, pin_memory=self.device.type == "cuda", generator=generator,
                          persistent_workers=False, prefetch_factor=4 if workers else None)

    def train_step(self, samples, references, labels) -> StepRecord:
        result = self.train_step_fn(samples, references, labels, loss_check=self._check_loss, device=self.device,
                                    key_seed=self.cfg.seed * 1_000_003 + self.step)
        self.step += 1
        # fp16: the scaler skips steps with inf gradients by design; otherwise they mean divergence
        norm = None if self.scaler.is_enabled() else grad_norm(self.backbone.parameters())
        self.monitor.check_step(self.step, norm)
        # A rank's accuracy is over its own rows (DCQ) or the global batch (sharded heads); the mean
        # over ranks is the global batch's either way.
        accuracy = distributed.all_reduce_mean(torch.tensor(result.head.accuracy)).item()
        return StepRecord(self.step, self.epoch, self._global_loss, accuracy, result.lr)

    def _check_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Stop before the optimiser step when the loss is NaN/Inf (and the test hook that causes it)."""
        if os.environ.get(NAN_INJECTION_ENV) == str(self.step + 1):
            loss = loss * float("nan")
        # The global batch's loss: a rank's loss is the mean over its own rows (DCQ) or over the
        # global batch (sharded heads), so the mean over ranks is the global loss either way, and
        # every rank sees the same value: all ranks stop together on a non-finite loss.
        self._global_loss = distributed.all_reduce_mean(loss.float()).item()
        self.monitor.check_loss(self.step + 1, self._global_loss)
        return loss

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        writer = None
        if self.run_folder is not None:
            self._notes = self.run_folder.begin(self._resumed_in_place) + self._notes
        if self.ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.out / "tb"))
            (self.out / "config.yaml").write_text(_yaml_dump(cfg.to_dict()))
        for note in self._notes:
            self.log(note)
        self.log(f"training {cfg.head} on {cfg.train_data}: {len(self.source)} images, "
                 f"{self.source.num_identities} identities, {self.steps_per_epoch} steps/epoch, "
                 f"{self.total_steps} steps, device {self.device}")
        bar = None
        # A bar on a terminal; plain lines every log_every steps when output goes to a file.
        self._print_lines = self.ctx.is_main and cfg.progress and not _on_terminal()
        if self.ctx.is_main and cfg.progress and _on_terminal():
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True)
        started, seen, records = time.time(), 0, []
        steps_file = open(self.out / "steps.jsonl", "a") if self.ctx.is_main else None
        self.train_step_fn.train()
        try:
            while self.step < self.total_steps:
                if self.position + cfg.batch_size > self.sampler.pairs.epoch_length:
                    self.epoch, self.position = self.epoch + 1, 0
                self.sampler.set_epoch(self.epoch, start=self.position)
                for samples, references, labels in self._loader():
                    rec = self.train_step(samples, references, labels)
                    self.position += cfg.batch_size
                    seen += samples.shape[0]
                    records.append(rec)
                    if steps_file is not None:
                        steps_file.write(json.dumps(rec.__dict__) + "\n")
                        steps_file.flush()
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                        rate = seen / max(1e-9, time.time() - started)
                        self._report(rec, rate, writer, bar)
                    if bar is not None:
                        bar.update(1)
                    end_of_epoch = self.position + cfg.batch_size > self.sampler.pairs.epoch_length
                    evaluate = (self.step % cfg.eval_every == 0) if cfg.eval_every else end_of_epoch
                    # Checkpoint first: an evaluation that fails must not lose the steps since the last one.
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self.save()
                    if evaluate:
                        self.evaluate(writer)
                        if self._saved_step == self.step and self.cfg.eval_bins:
                            self.save()  # again, now holding this evaluation's threshold and metrics
                    if self.step >= self.total_steps or end_of_epoch:
                        break
        finally:
            if bar is not None:
                bar.close()
            if steps_file is not None:
                steps_file.close()
            if getattr(self.pair_dataset, "bad_records", 0):
                self.log(f"skipped {self.pair_dataset.bad_records} undecodable records")
        if self._saved_step != self.step:
            self.save()
        if self._eval_step != self.step:
            self.evaluate(writer)
            if self.cfg.eval_bins:
                self.save()
        final = None
        if self.ctx.is_main:
            final = save_checkpoint(self.out / "final.pt", self._payload(training=False))
            if writer is not None:
                writer.close()
        train_seconds = time.time() - started
        self.log(f"done: {self.step} steps in {train_seconds:.1f}s; export {final}")
        distributed.barrier()
        return {"steps": self.step, "train_seconds": train_seconds, "metrics": self.last_metrics,
                "eval_history": self.eval_history,
                "final": str(final) if final else None, "threshold": self.threshold,
                "last_loss": records[-1].loss if records else None}

    def _report(self, rec: StepRecord, rate: float, writer, bar) -> None:
        extra = self.head.metrics()
        if writer is not None:
            writer.add_scalar("train/loss", rec.loss, rec.step)
            writer.add_scalar("train/head_accuracy", rec.accuracy, rec.step)
            writer.add_scalar("train/lr", rec.lr, rec.step)
            writer.add_scalar("train/samples_per_second", rate, rec.step)
            for name, value in extra.items():
                writer.add_scalar(f"train/{name}", value, rec.step)
        if bar is not None:
            bar.set_postfix(loss=f"{rec.loss:.3f}", acc=f"{rec.accuracy:.2f}", lr=f"{rec.lr:.3g}",
                            sps=f"{rate:.0f}")
        line = (f"step {rec.step} epoch {rec.epoch} loss {rec.loss:.4f} acc {rec.accuracy:.3f} "
                f"lr {rec.lr:.4g} {rate:.0f} samples/s" + "".join(f" {k} {v:.3g}" for k, v in extra.items()))
        self.log(line)
        if getattr(self, "_print_lines", False) and self._log_fn is None:
            print(f"{line} ({rec.step}/{self.total_steps})", flush=True)


def _on_terminal() -> bool:
    return sys.stderr.isatty()


def _yaml_dump(values: dict) -> str:
    import yaml

    return yaml.safe_dump(values, sort_keys=False)


def train(cfg: TrainConfig, resume: str | None = None, log_fn=None, overwrite: bool = False) -> dict[str, Any]:
    """Train `cfg` into `cfg.output`; `resume` = "latest", "auto" or a checkpoint path; `overwrite`
    replaces an earlier run in that folder (without it, a used folder is refused)."""
    try:
        trainer = Trainer(cfg, resume=resume, log_fn=log_fn, overwrite=overwrite)
        try:
            summary = trainer.run()
        finally:
            trainer.close()
    except Exception as exc:
        if not (distributed.is_distributed() and distributed.is_collective_failure(exc)):
            distributed.cleanup()
            raise
        raise distributed.CollectiveFailure(
            f"rank {distributed.rank()} of {distributed.world_size()}: a collective with the other ranks failed "
            f"({distributed.first_line(exc)}); another rank died or stalled for over dist_timeout="
            f"{cfg.dist_timeout:g}s. Checkpoints in {cfg.output} are intact: restart with --resume") from None
    distributed.cleanup()
    return summary
