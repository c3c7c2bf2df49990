"""Memory and time of a step: exact state counts, a live-tensor tracker, budgets, OOM handling."""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dcq.resources import available_memory  # noqa: F401  (its home is below training and benchmarks)

OOM = "out of memory"
FLOAT_BYTES = 4
# Share of the available memory a benchmark may plan to use (the rest is head-room for the
# process, the other heads' Python objects and whoever else uses the machine).
BUDGET_SHARE = 0.85


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


def time_interleaved(runners: dict, repeats: int, on_oom: Callable[[Any], None]) -> None:
    """`repeats` rounds that step every runner once, each round starting one runner later, so machine
    noise hits all alike; each step's seconds go to `runner.times`. A runner that runs out of memory
    is passed (by key) to `on_oom`, which must take it out of `runners`."""
    order = list(runners)
    for rep in range(repeats):
        k = rep % max(1, len(order))
        for key in order[k:] + order[:k]:
            if key not in runners:
                continue
            ok, seconds = attempt(runners[key].timed_step)
            if ok:
                runners[key].times.append(seconds)
            else:
                on_oom(key)


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
