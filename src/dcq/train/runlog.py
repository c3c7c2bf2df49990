"""What a run tells the people watching it: ``train.log``, ``steps.jsonl`` (one record per step),
TensorBoard scalars and a progress bar on a terminal, or plain lines every `log_every` steps when
output goes to a file. Only rank 0 writes; on other ranks every method does nothing.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

from dcq.train.rundir import RunFiles


@dataclass
class StepRecord:
    step: int
    epoch: int
    loss: float
    accuracy: float
    lr: float


def on_terminal() -> bool:
    return sys.stderr.isatty()


class RunLog:
    def __init__(self, files: RunFiles, is_main: bool, progress: bool, log_fn=None):
        self.files = files
        self.is_main = is_main
        self.progress = progress
        self.log_fn = log_fn  # also receives every log line (the demo prints them its own way)
        self.writer = None
        self._steps_file = None
        self._bar = None
        # plain lines on stdout when output goes to a file and nobody else takes the lines
        self._print_lines = is_main and progress and not on_terminal() and log_fn is None

    def log(self, message: str) -> None:
        if not self.is_main:
            return
        self.files.root.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.files.log, "a") as f:
            f.write(f"{stamp} {message}\n")
        if self.log_fn is not None:
            self.log_fn(message)

    def open(self, config_yaml: str, step: int, total_steps: int) -> None:
        """The run starts at `step`: write the config, open TensorBoard, steps.jsonl and the bar."""
        if not self.is_main:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.files.root.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(self.files.tensorboard))
        self.files.config.write_text(config_yaml)
        if self.progress and on_terminal():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True)
        self._steps_file = open(self.files.steps, "a")

    def record(self, rec: StepRecord) -> None:
        """Every step: its line in steps.jsonl and a tick of the bar."""
        if self._steps_file is not None:
            self._steps_file.write(json.dumps(rec.__dict__) + "\n")
            self._steps_file.flush()
        if self._bar is not None:
            self._bar.update(1)

    def report(self, rec: StepRecord, rate: float, head_metrics: dict[str, float], total_steps: int) -> None:
        """Every `log_every` steps: TensorBoard scalars, the bar's numbers and a log line."""
        if self.writer is not None:
            self.writer.add_scalar("train/loss", rec.loss, rec.step)
            self.writer.add_scalar("train/head_accuracy", rec.accuracy, rec.step)
            self.writer.add_scalar("train/lr", rec.lr, rec.step)
            self.writer.add_scalar("train/samples_per_second", rate, rec.step)
            for name, value in head_metrics.items():
                self.writer.add_scalar(f"train/{name}", value, rec.step)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{rec.loss:.3f}", acc=f"{rec.accuracy:.2f}", lr=f"{rec.lr:.3g}",
                                  sps=f"{rate:.0f}")
        line = (f"step {rec.step} epoch {rec.epoch} loss {rec.loss:.4f} acc {rec.accuracy:.3f} "
                f"lr {rec.lr:.4g} {rate:.0f} samples/s" + "".join(f" {k} {v:.3g}" for k, v in head_metrics.items()))
        self.log(line)
        if self._print_lines:
            print(f"{line} ({rec.step}/{total_steps})", flush=True)

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)

    def close_steps(self) -> None:
        """The training loop ended (normally or not): close the bar and steps.jsonl."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._steps_file is not None:
            self._steps_file.close()
            self._steps_file = None

    def close(self) -> None:
        self.close_steps()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
