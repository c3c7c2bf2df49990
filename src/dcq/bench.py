"""`dcq bench`: how the heads' step time and memory grow with the number of identities.

`dcq bench heads --classes 1e4,1e5,1e6` times one *head step* for every number of classes N:

- ``fc``   FullFC over all N classes;
- ``pfc``  PartialFC sampling ``--sample-rate`` of the class centres (its step gathers/scatters
           rows of weights and momentum around the optimiser step);
- ``dcq``  DynamicClassQueue with a fixed queue (``--queue``, 8192) and with a queue of
           ``--queue-fraction`` of the classes (the paper's ~10%).

A head step is what the head adds to a training step, run by the training step itself
(`dcq.train.step.TrainStep`) with precomputed embeddings and keys: forward + backward (the gradient
w.r.t. a random embedding batch that requires grad, as the backbone's output would) + the
optimiser step on the head's own state (SGD, momentum 0.9, weight decay 5e-4, for FC and Partial FC; DCQ has no
parameters and its "step" is the enqueue inside its forward). DCQ keys are random unit vectors: the
weight generator's cost belongs to the backbone and is measured by `benchmarks/train_step.py`.

Timing: all heads of one N are built side by side and, after warm-up, each repeat runs one step of
every head in a rotating order (heads interleaved), so machine noise hits all heads alike; the
median of the repeats is reported. If the heads of one N do not fit in memory together, they run in
groups, and the DCQ fixed-queue head (the reference of every ratio) joins every group.

Memory (bytes of live tensors, the same quantity on every device):
- ``state_bytes``: the head's resident state after a step, counted exactly: parameters, their
  ``.grad``, the optimiser's state tensors and the module's buffers (the DCQ queue), each storage
  counted once.
- ``peak_bytes``: the resident state at the start of a step plus the largest amount of extra tensor
  memory alive at any moment during the step. CUDA: ``torch.cuda.max_memory_allocated`` delta.
  CPU: a dispatch-mode tracker sees every tensor an operator creates (forward, backward and
  optimiser step) and when its storage is freed. It counts tensor storages, not allocator
  overhead or scratch memory a kernel allocates internally.

A size whose estimated need exceeds the memory budget (available RAM on CPU, free device memory on
CUDA, or ``--memory-budget``) is not allocated and is reported as out of memory; so is a CUDA OOM.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dcq.errors import DcqError

OOM = "out of memory"
FLOAT_BYTES = 4
# Share of the available memory a benchmark may plan to use (the rest is head-room for the
# process, the other heads' Python objects and whoever else uses the machine).
BUDGET_SHARE = 0.85


# -- command line -------------------------------------------------------------------------------
def configure_bench(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    heads = sub.add_parser(
        "heads",
        help="head step time and memory against the number of identities (FC, Partial FC, DCQ)",
        description="Time one head step (forward + backward + optimiser step) and count its memory "
        "for FC, Partial FC and DCQ at each number of classes; ratios are to DCQ with the fixed queue.",
    )
    heads.add_argument("--classes", default="1e4,1e5,1e6",
                       help="comma-separated numbers of classes, e.g. 1e4,1e5,1e6 (default: %(default)s)")
    heads.add_argument("--batch", type=int, default=128, help="embeddings per step (default: %(default)s)")
    heads.add_argument("--dim", type=int, default=512, help="embedding size (default: %(default)s)")
    heads.add_argument("--queue", type=int, default=8192, help="fixed DCQ queue size (default: %(default)s)")
    heads.add_argument("--queue-fraction", type=float, default=0.1,
                       help="second DCQ row: queue of this fraction of the classes (default: %(default)s)")
    heads.add_argument("--sample-rate", type=float, default=0.1,
                       help="Partial FC sample rate (default: %(default)s)")
    heads.add_argument("--repeats", type=int, default=5, help="timed steps per head (default: %(default)s)")
    heads.add_argument("--warmup", type=int, default=2, help="untimed steps per head first (default: %(default)s)")
    heads.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="default: %(default)s")
    heads.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                       help="embeddings' dtype; bf16 also runs the step under bf16 autocast, as mixed "
                       "precision training does (the heads compute logits in fp32 either way)")
    heads.add_argument("--memory-budget", default=None, metavar="BYTES",
                       help="report sizes whose estimated need exceeds this (e.g. 8G, 512M) as out of "
                       "memory (default: available RAM on CPU, free device memory on CUDA)")
    heads.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    heads.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    heads.add_argument("--json", default=None, metavar="OUT", help="write rows + config as JSON")
    heads.add_argument("--plot", default=None, metavar="OUT.png",
                       help="log-log plot of step time and state memory against classes")


def run_bench(args: argparse.Namespace) -> int:
    command = getattr(args, "bench_command", None)
    if command == "heads":
        return run_heads(args)
    raise DcqError("`dcq bench` needs a benchmark name: run `dcq bench heads --classes 1e4,1e5,1e6` "
                   "(see `dcq bench heads --help`)")


def run_heads(args: argparse.Namespace) -> int:
    config = HeadsConfig.from_args(args)
    result = bench_heads(config, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_table(result["rows"]))
    for line in summary_lines(result["rows"]):
        print(line)
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    if args.plot:
        save_plot(result["rows"], args.plot, title=_plot_title(result["config"]))
        print(f"wrote {args.plot}")
    return 0


# -- parsing helpers ----------------------------------------------------------------------------
def parse_count(text: str, what: str = "--classes") -> int:
    """'1e4' -> 10000, '250000' -> 250000; a whole number >= 1 or a DcqError."""
    try:
        value = float(text.strip()) if any(c in text for c in ".eE") else int(text.strip())
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value != int(value) or int(value) < 1:
        raise DcqError(f"{what}: {text.strip()!r} is not a whole number >= 1; "
                       "give numbers such as 1e4,1e5,1e6 or 100000")
    return int(value)


def parse_counts(text: str, what: str = "--classes") -> list[int]:
    parts = [p for p in str(text).split(",") if p.strip()]
    if not parts:
        raise DcqError(f"{what}: empty list; give comma-separated numbers such as 1e4,1e5,1e6")
    return [parse_count(p, what) for p in parts]


_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
          "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40, "TIB": 2**40}


def parse_bytes(text: str, what: str = "--memory-budget") -> int:
    """'8G' -> 8 GiB, '512M', '1e9' -> bytes (binary units)."""
    s = str(text).strip().upper()
    number = s.rstrip("KMGTIB")
    unit = s[len(number):]
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        value = -1
    if not value > 0 or not math.isfinite(value):
        raise DcqError(f"{what}: {text!r} is not a size in bytes; give e.g. 8G, 512M or 1e9")
    return int(value)


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# -- memory: exact state counts, a live-tensor tracker, budgets ----------------------------------
def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    st = t.untyped_storage()
    return (str(t.device), st.data_ptr())


def unique_tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views and shared storages count once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        st = t.untyped_storage()
        if st.nbytes() == 0:
            continue
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total


def state_tensors(modules: Iterable[nn.Module], optimizers: Iterable[torch.optim.Optimizer] = ()):
    """Parameters, their gradients, module buffers and optimiser state tensors."""
    for module in modules:
        for p in module.parameters():
            yield p
            if p.grad is not None:
                yield p.grad
        yield from module.buffers()
    for opt in optimizers:
        for state in opt.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    yield value


def state_bytes(modules: Iterable[nn.Module], optimizers: Iterable[torch.optim.Optimizer] = ()) -> int:
    return unique_tensor_bytes(state_tensors(list(modules), list(optimizers)))


class LiveTensorTracker(TorchDispatchMode):
    """Counts bytes of live tensor storages: the `existing` ones plus every storage an operator
    creates while the mode is active, minus those freed since; `peak` is the maximum.

    Freed storages are noticed through weak references (PyTorch keeps one Python object per
    storage alive as long as the storage is). Views and in-place results share an input's storage
    and are not counted again.
    """

    def __init__(self, existing: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[tuple[str, int], weakref.ref] = {}
        for t in existing:
            if torch.is_tensor(t):
                self._track(t)

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        nbytes = st.nbytes()
        key = _storage_key(t)
        if nbytes == 0 or key in self._refs:
            return

        tracker = weakref.ref(self)

        def freed(_ref, key=key, nbytes=nbytes, refs=self._refs, tracker=tracker):
            if refs.pop(key, None) is not None and tracker() is not None:
                tracker().live -= nbytes

        self._refs[key] = weakref.ref(st, freed)
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat_in = tree_leaves((args, kwargs))
        inputs = {_storage_key(t) for t in flat_in if torch.is_tensor(t)}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if torch.is_tensor(t) and _storage_key(t) not in inputs:
                self._track(t)
        return out


def available_memory(device: torch.device) -> int:
    """Bytes free to allocate now: CUDA free memory, or the kernel's MemAvailable on CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not refuse anything


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- the heads under test -----------------------------------------------------------------------
@dataclass(frozen=True)
class HeadCase:
    head: str  # "fc" | "pfc" | "dcq"
    classes: int
    queue_size: int | None = None
    sample_rate: float | None = None

    @property
    def label(self) -> str:
        if self.head == "fc":
            return "fc"
        if self.head == "pfc":
            return f"pfc {self.sample_rate:g}"
        return f"dcq q={self.queue_size}"

    def row(self) -> dict[str, Any]:
        return {"head": self.head, "classes": self.classes, "queue_size": self.queue_size,
                "sample_rate": self.sample_rate}


def pfc_num_sample(classes: int, sample_rate: float) -> int:
    return max(1, math.ceil(sample_rate * classes))


def estimate_head_bytes(case: HeadCase, batch: int, dim: int) -> tuple[int, int]:
    """(resident state, extra transient bytes of a step) for the OOM check, before allocating.

    The state is exact. The transient part was fitted to `LiveTensorTracker` measurements on CPU
    (B = batch, C = columns of the logits, d = dim, 4-byte floats) and is given 20% head-room:
    FC / Partial FC peak either in the forward (about four B x C logit-sized tensors + one
    normalised copy of the C x d weights) or in the backward + optimiser step (one B x C + about
    four C x d: normalised weights, their gradient, the normalisation's backward, the weight-decay
    term); DCQ holds about 4.5 B x C (logits, masks) plus the queue's copy made by the enqueue.
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
        from dcq.momentum import MomentumEncoder
        from dcq.train.step import TrainStep

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


def measure_peak(step: Callable[[], Any], resident: Callable[[], list[torch.Tensor]],
                 device: torch.device) -> int:
    """Run `step` once; return the bytes of `resident()` at its start + its peak extra live tensor bytes.

    `resident` is a function so that no reference to those tensors outlives this call's set-up
    (a gradient freed by `zero_grad(set_to_none=True)` during the step must really be freed).
    """
    if device.type == "cuda":
        base = unique_tensor_bytes(resident())
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return base + max(0, torch.cuda.max_memory_allocated(device) - before)
    tracker = LiveTensorTracker(resident())
    with tracker:
        step()
    return tracker.peak


def attempt(fn: Callable[..., Any], *args) -> tuple[bool, Any]:
    """(True, fn(*args)) or (False, None) when fn runs out of memory; other errors propagate.

    The exception (and with it the frames holding the failed step's tensors) is gone when this
    returns, so the caller can free the memory.
    """
    try:
        return True, fn(*args)
    except Exception as exc:  # only out-of-memory is expected
        if not is_oom(exc):
            raise
    return False, None


def _built_and_warm(case, cfg, device, amp_dtype, batches) -> HeadRunner:
    runner = HeadRunner(case, cfg.dim, device, amp_dtype, batches, cfg.seed)
    for _ in range(cfg.warmup):
        runner.step()
    return runner


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of `step` takes, device work included."""
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - start


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


# -- the benchmark ------------------------------------------------------------------------------
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
        torch.set_num_threads(cfg.threads)
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
        results: dict[HeadCase, dict[str, Any]] = {c: {"error": OOM} for c in oom}
        for c in oom:
            s, t = estimate(c)
            log(f"[{n}] {c.label}: needs ~{format_bytes(s + t)}, budget {format_bytes(budget)}: {OOM}")
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
            order = list(runners)
            for rep in range(cfg.repeats):
                k = rep % len(order) if order else 0
                for case in order[k:] + order[:k]:
                    if case not in runners:
                        continue
                    ok, seconds = attempt(runners[case].timed_step)
                    if ok:
                        runners[case].times.append(seconds)
                        continue
                    runners.pop(case).close()
                    results[case] = {"error": OOM}
                    log(f"[{n}] {case.label}: {OOM} during a step")
                    free_memory(device)
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


# -- output ---------------------------------------------------------------------------------------
def row_label(row: dict[str, Any]) -> str:
    if row["head"] == "fc":
        return "fc"
    if row["head"] == "pfc":
        return f"pfc {row['sample_rate']:g}"
    return f"dcq q={row['queue_size']}"


def _reference_rows(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per number of classes, the DCQ row with the fixed queue (the first DCQ row of that N)."""
    ref: dict[int, dict[str, Any]] = {}
    for row in rows:
        if row["head"] == "dcq" and row["classes"] not in ref:
            ref[row["classes"]] = row
    return ref


def _ratio(value, base) -> str:
    if value is None or not base:
        return "-"
    r = value / base
    return f"{r:.0f}x" if r >= 100 else f"{r:.2f}x" if r >= 0.01 else f"{r:.1e}x"


def format_table(rows: list[dict[str, Any]]) -> str:
    refs = _reference_rows(rows)
    header = ["classes", "head", "step ms", "vs dcq", "state", "vs dcq", "peak", "vs dcq"]
    lines = []
    for row in rows:
        ref = refs.get(row["classes"], {})
        if row.get("error"):
            lines.append([f"{row['classes']:,}", row_label(row), row["error"], "", "", "", "", ""])
            continue
        lines.append([
            f"{row['classes']:,}", row_label(row), f"{row['step_ms']:.2f}",
            _ratio(row["step_ms"], ref.get("step_ms")), format_bytes(row["state_bytes"]),
            _ratio(row["state_bytes"], ref.get("state_bytes")), format_bytes(row["peak_bytes"]),
            _ratio(row["peak_bytes"], ref.get("peak_bytes")),
        ])
    widths = [max(len(h), *(len(r[i]) for r in lines)) if lines else len(h) for i, h in enumerate(header)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [fmt(header), fmt(["-" * w for w in widths])]
    out += [fmt(r) for r in lines]
    out.append("ratios ('vs dcq') are to DCQ with the fixed queue at the same number of classes")
    return "\n".join(out)


def summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    """How DCQ's step time scales, and the state-memory ratios at the largest size."""
    refs = {n: r for n, r in _reference_rows(rows).items() if not r.get("error")}
    lines = []
    if len(refs) >= 2:
        lo, hi = min(refs), max(refs)
        lines.append(f"dcq q={refs[lo]['queue_size']} step time {lo:,} -> {hi:,} classes: "
                     f"{refs[hi]['step_ms'] / refs[lo]['step_ms']:.2f}x")
    if refs:
        n = max(refs)
        for row in rows:
            if row["classes"] == n and row["head"] in ("fc", "pfc"):
                what = "out of memory" if row.get("error") else (
                    f"state {_ratio(row['state_bytes'], refs[n]['state_bytes'])} dcq's")
                lines.append(f"{row_label(row)} at {n:,} classes: {what}")
    fcs = sorted((r["classes"], r["state_bytes"]) for r in rows if r["head"] == "fc" and not r.get("error"))
    if len(fcs) >= 2:
        (n0, s0), (n1, s1) = fcs[0], fcs[-1]
        lines.append(f"fc state {n0:,} -> {n1:,} classes: {s1 / s0:.1f}x for {n1 / n0:.0f}x the classes")
    return lines


def check_output_path(path: str | os.PathLike, what: str = "output") -> Path:
    """Fail early (before a long benchmark) if `path` cannot be written."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise DcqError(f"{what} {target}: folder {folder} does not exist; create it or choose another path")
    if target.is_dir():
        raise DcqError(f"{what} {target}: is a folder; give a file name")
    if not os.access(folder, os.W_OK):
        raise DcqError(f"{what} {target}: folder {folder} is not writable; choose another path")
    return target


def _atomic_target(path: str | os.PathLike) -> tuple[Path, str]:
    target = check_output_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or ".")
    os.close(fd)
    return target, tmp


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON atomically (temporary file in the same folder, then rename)."""
    target, tmp = _atomic_target(path)
    try:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _plot_title(config: dict[str, Any]) -> str:
    return (f"head step: batch {config['batch']}, dim {config['dim']}, {config['device']} "
            f"{config['dtype']}, {config['threads']} threads ({config.get('processor', '')})")


def save_plot(rows: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """Log-log step time and state memory against classes, one line per head variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[dict[str, Any]]] = {}
    refs = _reference_rows(rows)
    for row in rows:
        if row["head"] == "dcq":
            fixed = row is refs.get(row["classes"])
            key = f"DCQ, queue {row['queue_size']}" if fixed else "DCQ, queue = fraction of N"
        elif row["head"] == "pfc":
            key = f"Partial FC, rate {row['sample_rate']:g}"
        else:
            key = "FC"
        series.setdefault(key, []).append(row)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, items in series.items():
        ok = [r for r in items if not r.get("error")]
        oom = [r["classes"] for r in items if r.get("error")]
        label = key + (f" (OOM at {', '.join(f'{n:.0e}' for n in oom)})" if oom else "")
        if not ok:
            axes[0].plot([], [], marker="x", linestyle="none", label=label)
            continue
        xs = [r["classes"] for r in ok]
        axes[0].plot(xs, [r["step_ms"] for r in ok], marker="o", label=label)
        axes[1].plot(xs, [r["state_bytes"] / 2**20 for r in ok], marker="o", label=key)
    axes[0].set_ylabel("step time (ms)")
    axes[1].set_ylabel("head state (MiB)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("number of classes (identities)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    target, tmp = _atomic_target(path)
    try:
        fig.savefig(tmp, format=target.suffix.lstrip(".").lower() or "png", dpi=120)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
