"""The training loop: one loop for every head; it runs steps and evaluates, nothing else.

What it runs is built elsewhere: the data feed (`feed`), the model, optimiser and step (`build`),
the checkpointed state (`state`), the output folder (`rundir`) and the logs (`runlog`). Each step
is `dcq.train.step.TrainStep` (shared with `dcq bench` and the benchmarks). The loop never asks
which head it runs: the step calls ``head(embeddings, labels, key=key)`` and the loop logs the
loss, accuracy and ``head.metrics()``.
"""

from __future__ import annotations

import gc
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dcq import distributed
from dcq.errors import DcqError
from dcq.resources import set_threads
from dcq.seeds import stream_seed
from dcq.train.build import build_model
from dcq.train.config import TrainConfig
from dcq.train.divergence import DivergenceMonitor, TrainingDiverged
from dcq.train.feed import TrainingData
from dcq.train.memory_check import check_fits
from dcq.train.rundir import RunFiles, RunFolder, latest_checkpoint
from dcq.train.runlog import RunLog, StepRecord, on_terminal
from dcq.train.state import TrainingState

__all__ = ["Trainer", "TrainingDiverged", "TrainingStopped", "train"]


class TrainingStopped(DcqError):
    """SIGTERM (a cluster's pre-emption): the run saved a checkpoint at the step it reached and stopped."""

    exit_code = 143  # 128 + SIGTERM, what a scheduler expects of a process it terminated


class Trainer:
    """Builds everything from a TrainConfig and runs it; `run()` returns the final summary."""

    def __init__(self, cfg: TrainConfig, resume: str | None = None, log_fn=None, overwrite: bool = False):
        self.cfg = cfg
        self.ctx = distributed.setup(cfg.device, timeout=cfg.dist_timeout)
        self.device = self.ctx.device
        self.files = RunFiles(cfg.output)
        self.runlog = RunLog(self.files, self.ctx.is_main, cfg.progress, log_fn)
        notes: list[str] = []  # logged once the run folder is claimed
        if cfg.threads:
            used = set_threads(cfg.threads)
            if used != cfg.threads:
                notes.append(f"threads={cfg.threads} is more than the {used} CPUs here; using {used}")
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
            if self.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels once
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        random.seed(cfg.seed)

        if cfg.amp == "fp16" and self.device.type != "cuda":
            raise DcqError("amp=fp16 needs CUDA; on CPU use amp=bf16 or amp=none")
        for bin_path in cfg.eval_bins:  # found now, not at the first evaluation hours later
            if not Path(bin_path).is_file():
                raise DcqError(f"config: eval_bins entry {bin_path} does not exist; fix the path or remove it")
        if resume and resume not in ("latest", "auto") and not Path(resume).is_file():
            raise DcqError(f"--resume {resume}: checkpoint not found")
        self.data = TrainingData.open(cfg, self.ctx.rank, self.ctx.world_size)
        n_ids = int(self.data.source.num_identities)
        check_fits(cfg, n_ids, self.device, self.ctx.world_size)
        # Claim the output folder (lock, no mixing with an earlier run) before anything is written.
        self.run_folder = RunFolder(self.files.root) if self.ctx.is_main else None
        if self.run_folder is not None:
            self.run_folder.claim(resume=bool(resume), overwrite=overwrite)
        try:
            self.data.prepare_items(cfg, progress=cfg.progress and on_terminal())
            self.steps_per_epoch = self.data.epoch_length // cfg.batch_size
            self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
            self.model = build_model(cfg, n_ids, self.ctx, self.steps_per_epoch, self.total_steps,
                                     resuming=resume not in (None, "auto"), notes=notes)
            self.state = TrainingState(cfg, self.model, self.ctx, self.files, self.data.fingerprint,
                                       self.data.source.identity_names)
            if resume:
                notes += self.state.resume(resume)
        except BaseException:
            if self.run_folder is not None:
                self.run_folder.release(started=False)
            raise
        self._notes = notes
        self.eval_history: list[dict[str, Any]] = []  # {"step", "<bin>": accuracy, ...} per evaluation
        self._eval_step = -1
        self._terminate = False  # SIGTERM seen by this rank (read with the next step's statistics)
        self._stop = False  # some rank saw SIGTERM: every rank saves and stops after this step
        root = self.files.root  # not `self`: a closure over the trainer would keep it alive in a cycle
        self.monitor = DivergenceMonitor(self.model.feature_extractor.parameters(), root,
                                         lambda: latest_checkpoint(root) is not None)

    # Short names for what tests and tools inspect.
    @property
    def progress(self):
        return self.state.progress

    @property
    def step(self) -> int:
        return self.state.progress.step

    @property
    def head(self):
        return self.model.head

    @property
    def optimizer(self):
        return self.model.optimizer

    @property
    def source(self):
        return self.data.source

    @property
    def sampler(self):
        return self.data.sampler

    def close(self) -> None:
        """Unlock the output folder (also done when the process ends)."""
        if self.run_folder is not None:
            self.run_folder.release()

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        """Verification on every `eval_bins` file with the evaluation encoder; keeps the best export."""
        p = self.progress
        self._eval_step = p.step
        if not self.cfg.eval_bins or not self.ctx.is_main:
            return {}
        from dcq.eval import evaluate_bin

        encoder = self.model.eval_encoder()
        was_training = encoder.training
        encoder.eval()
        results = {}
        try:
            for bin_path in self.cfg.eval_bins:
                name = Path(bin_path).stem
                results[name] = evaluate_bin(encoder, bin_path, self.cfg.image_size,
                                             batch_size=self.cfg.eval_batch_size, device=self.device)
                self.runlog.scalar(f"eval/{name}/accuracy", results[name]["accuracy"], p.step)
                self.runlog.log(f"step {p.step} eval {name}: accuracy {results[name]['accuracy']:.4f} "
                                f"± {results[name]['accuracy_std']:.4f}")
        finally:
            encoder.train(was_training)
        first = results[Path(self.cfg.eval_bins[0]).stem]
        self.eval_history.append({"step": p.step, **{name: r["accuracy"] for name, r in results.items()}})
        p.threshold = float(first["threshold"])
        p.metrics = results
        if first["accuracy"] > p.best_accuracy:
            p.best_accuracy = float(first["accuracy"])
            self.state.export(self.files.best)
        return results

    # -- the loop -----------------------------------------------------------------------------
    def _request_stop(self, signum, frame) -> None:
        self._terminate = True

    def _stop_now(self) -> None:
        """Every rank agreed to stop after this step (SIGTERM): a checkpoint of it, then TrainingStopped."""
        p = self.progress
        if self.state.saved_step != p.step:
            self._save()
        where = self.files.checkpoint(p.step)
        self.runlog.log(f"SIGTERM: stopped after step {p.step}; checkpoint {where}; continue with --resume")
        raise TrainingStopped(f"stopped by SIGTERM after step {p.step}; checkpoint {where} saved: "
                              "continue exactly with --resume")

    def _save(self) -> None:
        """A training checkpoint, once the weights the last step wrote are checked (the per-step check
        reads them before that step's update)."""
        self.monitor.check_weights(self.progress.step)
        self.state.save()

    def _loader(self):
        return self.data.loader(self.cfg, self.progress.epoch, pin_memory=self.device.type == "cuda")

    def run(self) -> dict[str, Any]:
        cfg, p, log = self.cfg, self.progress, self.runlog
        if self.run_folder is not None:
            self._notes = self.run_folder.begin(self.state.resumed_in_place) + self._notes
        log.open(_yaml_dump(cfg.to_dict()), p.step, self.total_steps)
        for note in self._notes:
            log.log(note)
        log.log(f"training {cfg.head} on {cfg.train_data}: {len(self.data.source)} images, "
                f"{self.data.source.num_identities} identities, {self.steps_per_epoch} steps/epoch, "
                f"{self.total_steps} steps, device {self.device}")
        head = self.model.head
        log.log(f"head {type(head).__name__}({head.extra_repr()})")  # e.g. what in_batch_negatives=auto chose
        started, seen, last = time.time(), 0, None
        self.model.update.train()
        previous = _on_sigterm(self._request_stop)
        try:
            while p.step < self.total_steps:
                if p.position + cfg.batch_size > self.data.epoch_length:
                    p.epoch, p.position = p.epoch + 1, 0
                self.data.sampler.set_epoch(p.epoch, start=p.position)
                for samples, references, labels in self._loader():
                    last = self.train_step(samples, references, labels)
                    p.position += cfg.batch_size
                    seen += samples.shape[0]
                    log.record(last)
                    if p.step % cfg.log_every == 0 or p.step == self.total_steps:
                        rate = seen / max(1e-9, time.time() - started)
                        log.report(last, rate, self.model.head.metrics(), self.total_steps)
                    end_of_epoch = p.position + cfg.batch_size > self.data.epoch_length
                    evaluate = (p.step % cfg.eval_every == 0) if cfg.eval_every else end_of_epoch
                    # Checkpoint first: an evaluation that fails must not lose the steps since the last one.
                    if (p.step % cfg.checkpoint_every == 0) if cfg.checkpoint_every else end_of_epoch:
                        self._save()
                    if evaluate:
                        self.evaluate()
                        if self.state.saved_step == p.step and cfg.eval_bins:
                            self._save()  # again, now holding this evaluation's threshold and metrics
                    if self._stop:
                        self._stop_now()
                    if p.step >= self.total_steps or end_of_epoch:
                        break
        finally:
            _on_sigterm(previous)
            log.close_steps()
            if self.data.bad_records:
                log.log(f"skipped {self.data.bad_records} undecodable records")
        if self.state.saved_step != p.step:
            self._save()
        if self._eval_step != p.step:
            self.evaluate()
            if cfg.eval_bins:
                self._save()
        final = self.state.export(self.files.final)
        log.close()
        train_seconds = time.time() - started
        log.log(f"done: {p.step} steps in {train_seconds:.1f}s; export {final}")
        distributed.barrier()
        return {"steps": p.step, "train_seconds": train_seconds, "metrics": p.metrics,
                "eval_history": self.eval_history,
                "final": str(final) if final else None, "threshold": p.threshold,
                "last_loss": last.loss if last else None}

    def train_step(self, samples, references, labels) -> StepRecord:
        p = self.progress
        result = self.model.update(samples, references, labels, loss_check=self._check_step, device=self.device,
                                 key_seed=stream_seed(self.cfg.seed, p.step))
        p.step += 1
        loss, accuracy = result.checked
        return StepRecord(p.step, p.epoch, loss, accuracy, result.lr)

    def _check_step(self, stats: torch.Tensor) -> tuple[float, float]:
        """The step's one host synchronisation, before the optimiser step: the global batch's loss and
        head accuracy, the gradient norm and the weight norm, read back together; stops the run on a
        non-finite loss or gradient, or on weights that blew up in an earlier step."""
        # A rank's loss and accuracy are over its own rows (DCQ) or over the global batch (sharded
        # heads), so their mean over ranks is the global batch's either way; gradients and weights are
        # equal on every rank. One collective of a tensor on the training device, then one read:
        # every rank sees the same values and all ranks stop together.
        # ...and whether any rank was sent SIGTERM, so that all ranks stop after the same step
        stop = torch.full((1,), float(self._terminate), device=stats.device)
        stats = torch.cat([stats, self.monitor.weight_norm().to(stats.device).reshape(1), stop])
        loss, accuracy, gradient, weights, stop = distributed.all_reduce_mean(stats).tolist()
        self._stop = stop > 0
        step = self.progress.step + 1
        self.monitor.check_loss(step, loss)
        # fp16: the scaler skips steps with inf gradients by design; otherwise they mean divergence
        self.monitor.check_step(step, None if self.model.scaler.is_enabled() else gradient, weights)
        return loss, accuracy


def _on_sigterm(handler):
    """Install `handler` for SIGTERM and return the one it replaces (None where signals cannot be set:
    outside the main thread)."""
    import signal

    if handler is None:
        return None
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


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
    # Free the trainer (its DDP wrapper holds the process group) here, before the group is destroyed,
    # not whenever the cyclic GC gets to it, perhaps in interpreter teardown: torch's first import of
    # torch._dynamo (in Trainer.__init__, building the backbone on the meta device) leaves a frame
    # cycle that holds __init__'s `self`. (`dcq train` under torchrun then skips the interpreter's
    # teardown, where a finished rank could still abort: `distributed.exit_process`.)
    del trainer
    gc.collect()
    distributed.cleanup()
    return summary
