"""The head benchmark: the cases (FC, Partial FC, DCQ at each N), their memory estimates, the runner
(one head stepping through the training step) and the interleaved timing loop."""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dcq.bench.memory import (
    BUDGET_SHARE,
    FLOAT_BYTES,
    OOM,
    attempt,
    available_memory,
    free_memory,
    measure_peak,
    state_bytes,
    state_tensors,
    time_interleaved,
    timed,
)
from dcq.bench.report import check_output_path, row_label
from dcq.bench.units import format_bytes, parse_bytes, parse_counts
from dcq.errors import DcqError
from dcq.momentum import MomentumEncoder
from dcq.resources import set_threads
from dcq.train.step import TrainStep


@dataclass(frozen=True)
class HeadCase:
    head: str  # "fc" | "pfc" | "dcq"
    classes: int
    queue_size: int | None = None
    sample_rate: float | None = None

    @property
    def label(self) -> str:
        return row_label(self.row())

    def row(self) -> dict[str, Any]:
        return {"head": self.head, "classes": self.classes, "queue_size": self.queue_size,
                "sample_rate": self.sample_rate}


def pfc_num_sample(classes: int, sample_rate: float) -> int:
    return max(1, math.ceil(sample_rate * classes))


def estimate_head_bytes(case: HeadCase, batch: int, dim: int) -> tuple[int, int]:
    """(resident state, extra transient bytes of a step) for the OOM check, before allocating.

    The state is exact. The transient part was fitted to `LiveTensorTracker` measurements on CPU
    (B = batch, C = columns of the logits, d = dim, 4-byte floats) and is given 20% head-room:
    FC / Partial FC peak either in the forward (about four B x C logit-sized tensors + one C x d
    term) or in the backward + optimiser step (one B x C + about four C x d: the weight gradient
    and the optimiser's temporaries such as the weight-decay term); DCQ holds about 4.5 B x C
    (logits, masks) plus the queue's copy made by the enqueue.
    """
    f = FLOAT_BYTES
    if case.head == "fc":
        c = case.classes
        state = 3 * c * dim * f  # weight, grad, momentum
        transient = max(4 * batch * c + c * dim, batch * c + 4 * c * dim) * f
    elif case.head == "pfc":
        n, c = case.classes, pfc_num_sample(case.classes, case.sample_rate)
        c = max(c, min(batch, n))  # more positives than the sample: all positives
        # full weight + momentum rows (N x d); sampled sub-weight, its grad and momentum (C x d)
        state = 2 * n * dim * f + 3 * c * dim * f
        transient = max(4 * batch * c + c * dim, batch * c + 4 * c * dim) * f + n * (4 + 8) + c * 16
    elif case.head == "dcq":
        c = case.queue_size
        state = c * dim * f + c * 8 + 16  # queue weights, labels, ptr, count
        transient = (4.5 * batch * c + c * dim) * f + c * 16
    else:  # pragma: no cover - cases are built here
        raise ValueError(case.head)
    return int(state), int(1.2 * (transient + 4 * batch * dim * f))


def make_head(case: HeadCase, dim: int) -> nn.Module:
    import dcq

    if case.head == "fc":
        return dcq.FullFC(dim, case.classes)
    if case.head == "pfc":
        return dcq.PartialFC(dim, case.classes, sample_rate=case.sample_rate)
    return dcq.DynamicClassQueue(embedding_size=dim, queue_size=case.queue_size)


class PrecomputedEmbeddings(nn.Module):
    """The feature extractor's stand-in in a head step: hands the step a fresh leaf of the given
    embeddings that requires grad, as the backbone's output would (no parameters, no cost)."""

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings.detach().requires_grad_(True)


class HeadRunner:
    """One head with its optimiser, stepping on a shared pool of random batches through the
    training step (`dcq.train.step.TrainStep`) with precomputed embeddings and keys."""

    def __init__(self, case: HeadCase, dim: int, device: torch.device, amp_dtype: torch.dtype | None,
                 batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], seed: int):
        self.case = case
        self.device = device
        self.batches = batches
        self.step_index = 0
        self.times: list[float] = []
        torch.manual_seed(seed)
        with torch.device(device):
            head = make_head(case, dim)
        self.head = head.to(device)
        params = [p for p in self.head.parameters() if p.requires_grad]
        self.optimizer = (torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4) if params else None)
        if self.optimizer is not None:
            self.head.bind_optimizer(self.optimizer)
        if case.head == "dcq":  # a full queue: random unit keys with random labels
            gen = torch.Generator(device="cpu").manual_seed(seed + 1)
            keys = torch.nn.functional.normalize(torch.randn(case.queue_size, dim, generator=gen), dim=1)
            labels = torch.randint(0, case.classes, (case.queue_size,), generator=gen)
            self.head.queue.enqueue(keys.to(device), labels.to(device))
            del keys, labels
        # keys are given: the weight generator is a pass-through (an EMA of nothing)
        generator = MomentumEncoder(nn.Identity()) if self.head.needs_key else None
        amp = {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
        self.train_step = TrainStep(PrecomputedEmbeddings(), self.head, self.optimizer, generator, amp=amp)

    def step(self) -> None:
        emb, labels, key = self.batches[self.step_index % len(self.batches)]
        self.step_index += 1
        self.train_step(emb, key.unsqueeze(1), labels)  # one reference per sample: (B, 1, d)

    def timed_step(self) -> float:
        return timed(self.step, self.device)

    def state_bytes(self) -> int:
        return state_bytes([self.head], [self.optimizer] if self.optimizer is not None else [])

    def state_tensors(self) -> list[torch.Tensor]:
        return list(state_tensors([self.head], [self.optimizer] if self.optimizer is not None else []))

    def peak_step_bytes(self) -> int:
        """Resident state at the start of a step + the most extra tensor memory alive during it."""
        return measure_peak(self.step, self.state_tensors, self.device)

    def close(self) -> None:
        self.head = None
        self.optimizer = None
        self.train_step = None


def _built_and_warm(case, cfg, device, amp_dtype, batches) -> HeadRunner:
    runner = HeadRunner(case, cfg.dim, device, amp_dtype, batches, cfg.seed)
    for _ in range(cfg.warmup):
        runner.step()
    return runner


def make_batches(count: int, batch: int, dim: int, classes: int, device: torch.device,
                 dtype: torch.dtype, seed: int):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _ in range(count):
        emb = torch.randn(batch, dim, generator=gen).to(device=device, dtype=dtype)
        labels = torch.randint(0, classes, (batch,), generator=gen).to(device)
        key = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1).to(device)
        out.append((emb, labels, key))
    return out


@dataclass
class HeadsConfig:
    classes: list[int]
    batch: int = 128
    dim: int = 512
    queue: int = 8192
    queue_fraction: float = 0.1
    sample_rate: float = 0.1
    repeats: int = 5
    warmup: int = 2
    device: str = "cpu"
    dtype: str = "fp32"
    memory_budget: int | None = None
    threads: int | None = None
    seed: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> HeadsConfig:
        cfg = cls(
            classes=parse_counts(args.classes),
            batch=args.batch, dim=args.dim, queue=args.queue, queue_fraction=args.queue_fraction,
            sample_rate=args.sample_rate, repeats=args.repeats, warmup=args.warmup, device=args.device,
            dtype=args.dtype,
            memory_budget=None if args.memory_budget is None else parse_bytes(args.memory_budget),
            threads=args.threads, seed=args.seed,
        )
        cfg.validate()
        for option in ("json", "plot"):
            path = getattr(args, option, None)
            if path:
                check_output_path(path, f"--{option}")
        return cfg

    def validate(self) -> None:
        for name in ("batch", "dim", "queue", "repeats"):
            if int(getattr(self, name)) < 1:
                raise DcqError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise DcqError(f"--warmup must be >= 0, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise DcqError(f"--threads must be >= 1, got {self.threads}")
        for name in ("queue_fraction", "sample_rate"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise DcqError(f"--{name.replace('_', '-')} must be in (0, 1], got {value}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise DcqError(f"--device cuda: torch {torch.__version__} sees no CUDA device; "
                           "run on a machine with a GPU and a CUDA build of torch, or use --device cpu")

    def cases(self, classes: int) -> list[HeadCase]:
        """FC, Partial FC, DCQ (fixed queue), DCQ (queue = fraction of classes); a duplicate queue
        size (fraction x N == fixed queue) gives one DCQ row."""
        frac_queue = max(1, round(self.queue_fraction * classes))
        cases = [HeadCase("fc", classes), HeadCase("pfc", classes, sample_rate=self.sample_rate),
                 HeadCase("dcq", classes, queue_size=self.queue)]
        if frac_queue != self.queue:
            cases.append(HeadCase("dcq", classes, queue_size=frac_queue))
        return cases


def plan_groups(cases: list[HeadCase], reference: HeadCase, estimate: Callable[[HeadCase], tuple[int, int]],
                budget: int) -> tuple[list[list[HeadCase]], list[HeadCase]]:
    """Split the heads of one N into groups whose estimated need fits `budget` together.

    A head that does not fit alone is out of memory. The reference head (DCQ, fixed queue) joins
    every group it fits into, so each ratio to it is measured side by side; a head that fits only
    alone runs alone.
    """

    def need(group: list[HeadCase]) -> int:
        ests = [estimate(c) for c in group]
        return sum(s for s, _ in ests) + max(t for _, t in ests)

    oom = [c for c in cases if need([c]) > budget]
    groups: list[list[HeadCase]] = []
    for case in cases:
        if case in oom or case == reference:
            continue
        for group in groups:
            if need(group + [case]) <= budget:
                group.append(case)
                break
        else:
            with_ref = [reference, case] if reference not in oom else [case]
            groups.append(with_ref if need(with_ref) <= budget else [case])
    if reference not in oom and not any(reference in g for g in groups):
        groups.append([reference])
    return groups, oom


def bench_heads(cfg: HeadsConfig, log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Run the head benchmark; returns {"rows": [...], "config": {...}} (the `--json` document)."""
    cfg.validate()
    device = torch.device(cfg.device)
    if cfg.threads:
        set_threads(cfg.threads)
    amp_dtype = torch.bfloat16 if cfg.dtype == "bf16" else None
    emb_dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    rows: list[dict[str, Any]] = []
    grouping = []

    def estimate(case: HeadCase) -> tuple[int, int]:
        return estimate_head_bytes(case, cfg.batch, cfg.dim)

    for n in cfg.classes:
        cases = cfg.cases(n)
        reference = cases[2]
        free_memory(device)
        budget = cfg.memory_budget if cfg.memory_budget is not None else int(
            BUDGET_SHARE * available_memory(device))
        groups, oom = plan_groups(cases, reference, estimate, budget)
        results: dict[HeadCase, dict[str, Any]] = {}
        for c in oom:
            s, t = estimate(c)
            # A budget the user set is not the machine running out: say which limit refused the head.
            error = OOM if cfg.memory_budget is None else f"over --memory-budget (needs {format_bytes(s + t)})"
            results[c] = {"error": error}
            log(f"[{n}] {c.label}: needs ~{format_bytes(s + t)}, budget {format_bytes(budget)}: {error}")
        grouping.append({"classes": n, "budget_bytes": budget,
                         "groups": [[c.label for c in g] for g in groups]})
        batches = make_batches(4, cfg.batch, cfg.dim, n, device, emb_dtype, cfg.seed + n) if groups else []
        last_ref_group = max((i for i, g in enumerate(groups) if reference in g), default=-1)
        ref_runner: HeadRunner | None = None
        for gi, group in enumerate(groups):
            runners: dict[HeadCase, HeadRunner] = {}
            for case in group:
                if case == reference and ref_runner is not None:
                    runners[case] = ref_runner
                    continue
                ok, runner = attempt(_built_and_warm, case, cfg, device, amp_dtype, batches)
                if ok:
                    runners[case] = runner
                else:
                    results[case] = {"error": OOM}
                    log(f"[{n}] {case.label}: {OOM} while building / warming up")
                    free_memory(device)
                del runner
            log(f"[{n}] timing {', '.join(c.label for c in runners)} ({cfg.repeats} interleaved repeats)")

            def out_of_memory(case, runners=runners, n=n):
                runners.pop(case).close()
                results[case] = {"error": OOM}
                log(f"[{n}] {case.label}: {OOM} during a step")
                free_memory(device)

            time_interleaved(runners, cfg.repeats, out_of_memory)
            ref_runner = runners.get(reference)
            for case, runner in list(runners.items()):
                if case == reference and gi != last_ref_group:
                    continue  # the reference keeps stepping in a later group; measure it there
                ok, peak = attempt(runner.peak_step_bytes)
                if ok:
                    state = runner.state_bytes()
                    results[case] = {"step_ms": 1000.0 * statistics.median(runner.times),
                                     "state_bytes": state, "peak_bytes": peak}
                    log(f"[{n}] {case.label}: {results[case]['step_ms']:.2f} ms, state "
                        f"{format_bytes(state)}, peak {format_bytes(peak)}")
                else:
                    results[case] = {"error": OOM}
                if case != reference or not ok:
                    runner.close()
                    if case == reference:
                        ref_runner = None
            del runners, runner
            free_memory(device)
        if ref_runner is not None:
            ref_runner.close()
        del ref_runner, batches
        free_memory(device)
        for case in sorted(cases, key=lambda c: ("fc", "pfc", "dcq").index(c.head)):
            res = results.get(case, {"error": OOM})
            row = case.row()
            if "error" in res:
                row.update(step_ms=None, state_bytes=None, peak_bytes=None, error=res["error"])
            else:
                row.update(step_ms=round(res["step_ms"], 4), state_bytes=int(res["state_bytes"]),
                           peak_bytes=int(res["peak_bytes"]))
            rows.append(row)
    return {"rows": rows, "config": _config_dict(cfg, device, grouping)}


def _config_dict(cfg: HeadsConfig, device: torch.device, grouping: list) -> dict[str, Any]:
    info = {
        "benchmark": "heads",
        "classes": cfg.classes, "batch": cfg.batch, "dim": cfg.dim, "queue": cfg.queue,
        "queue_fraction": cfg.queue_fraction, "sample_rate": cfg.sample_rate, "repeats": cfg.repeats,
        "warmup": cfg.warmup, "device": cfg.device, "dtype": cfg.dtype, "seed": cfg.seed,
        "memory_budget": cfg.memory_budget, "threads": torch.get_num_threads(),
        "optimizer": "SGD(lr=0.1, momentum=0.9, weight_decay=5e-4) for fc/pfc; dcq has no parameters",
        "step": "forward + backward (grad w.r.t. embeddings) + optimiser step on the head's state; "
                "dcq: + enqueue; random unit keys",
        "step_ms": "median over repeats, heads interleaved in rotating order",
        "state_bytes": "parameters + .grad + optimizer state tensors + module buffers, each storage once",
        "peak_bytes": ("resident state + torch.cuda.max_memory_allocated delta during one step"
                       if device.type == "cuda" else
                       "resident state + peak extra live tensor storage during one step (dispatch-mode "
                       "tracker; excludes allocator overhead and kernel-internal scratch)"),
        "groups": grouping,
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "processor": _processor_name(device),
    }
    return info


def _processor_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or "unknown"
