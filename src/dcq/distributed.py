"""Multi-process helpers: process-group setup and the few collectives the heads and trainer use.

The distributed code paths are the single-process ones plus collectives: with world size 1 (plain
`dcq train`, no torchrun) nothing here calls `init_process_group`, and every helper returns its
input unchanged. Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) `setup` joins the process group
with a bounded collective timeout, so a lost rank ends the others with an error instead of a hang.

This module sits below `heads/`: heads take `distributed=True` as a constructor option and call
these helpers themselves; the trainer never injects anything into a head.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from dcq.errors import DcqError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DcqError(f"device={name!r} but CUDA is not available here; use --set device=cpu")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


def launched_world_size() -> int:
    """The number of ranks torchrun started (its WORLD_SIZE; 1 for a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def exit_process(code: int) -> NoReturn:
    """End this rank at once with `code`, after flushing what it printed and logged.

    The interpreter's teardown is skipped (no atexit handlers, no C++ static destructors): under
    torchrun, a rank whose work is saved and whose process group is destroyed can still abort there,
    in a backend thread's destructor ("terminate called without an active exception", SIGABRT), and
    torchrun then reports the finished run as failed. Call it only once everything is written."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken stream: nothing left to save
            pass
    logging.shutdown()
    os._exit(code)


def setup(device: str, timeout: float = 600.0) -> DistContext:
    """Read torchrun's environment; initialise the process group only when WORLD_SIZE > 1.

    `timeout` (seconds) bounds every collective: when another rank dies or hangs, the collective
    this rank is waiting in fails after at most that long (gloo usually notices a killed peer at
    once, through the closed connection).
    """
    world = launched_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        # Also for one process on cuda:N, N > 0: kernels, cuDNN/cuBLAS handles and allocations that
        # name no device (torch.cuda.* helpers, autocast, some libraries) then go to that GPU, not to GPU 0.
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            # NCCL only raises on a timed-out collective with asynchronous error handling on.
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        try:
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=float(timeout)))
        except (RuntimeError, ValueError) as exc:
            raise DcqError(f"rank {rank} of {world}: could not join the process group within {timeout:g}s "
                           f"({first_line(exc)}); check MASTER_ADDR/MASTER_PORT or torchrun's --rdzv flags") from None
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev)


class CollectiveFailure(DcqError):
    """A collective failed: another rank died, hung past the timeout, or its connection closed.

    The process group is unusable afterwards and its backend threads may abort a normal interpreter
    exit, so the command line reports this in one line and leaves with `os._exit`.
    """


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def is_collective_failure(exc: BaseException) -> bool:
    """Whether `exc` is what a collective raises when a peer died, hung past the timeout or closed."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        word in text for word in ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset", "timed out",
                                  "Timed out", "Broken pipe", "Socket"))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0, in rank order (no gradient)."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather_rows_to_main(tensor: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Rank 0: the row blocks of every rank (`counts[r]` rows on rank r), concatenated in rank order
    in host memory; other ranks: their own block, unchanged (they write nothing).

    The blocks travel one at a time, point to point, and each is copied to the host as it arrives,
    so no GPU ever holds more than its own rows and one other block: a checkpoint of 10M class
    centres does not need the full N x d tensor on any GPU (a collective: every rank calls it)."""
    if not is_distributed():
        return tensor
    tensor = tensor.detach().contiguous()
    if dist.get_rank() != 0:
        dist.send(tensor, dst=0)
        return tensor
    full = torch.empty((sum(counts), *tensor.shape[1:]), dtype=tensor.dtype)  # off-device: what rank 0 saves
    full[: counts[0]] = tensor.cpu()
    start = counts[0]
    for src in range(1, len(counts)):
        block = torch.empty((counts[src], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        dist.recv(block, src=src)
        full[start : start + counts[src]] = block.cpu()
        start += counts[src]
    return full


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward returns this rank's rows of the gradient summed over ranks."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, grad_scale: float) -> torch.Tensor:
        ctx.rows, ctx.grad_scale = tensor.shape[0], grad_scale
        return all_gather_cat(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows] * ctx.grad_scale, None


def all_gather_with_grad(tensor: torch.Tensor, grad_scale: float = 1.0) -> torch.Tensor:
    """All-gather along dim 0 that carries gradients back to every rank's own rows.

    Every rank must pass the same number of rows. The backward sums the gradient of a row over all
    ranks (each rank's loss may use every row) and multiplies it by `grad_scale`.
    """
    if not is_distributed():
        return tensor
    return _GatherWithGrad.apply(tensor, float(grad_scale))


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over ranks (a detached copy; the input is left as it is)."""
    if not is_distributed():
        return tensor.detach()
    out = tensor.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
