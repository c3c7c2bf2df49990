"""How much memory is free, and how to print a byte count: shared by training and `dcq bench`."""

from __future__ import annotations

import os

import torch


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


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def set_threads(requested: int) -> int:
    """Set torch's intra-op threads to `requested`, at most the CPUs this process may use (asking
    for far more crashes some OpenMP builds); returns the number set."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    used = max(1, min(int(requested), cpus))
    torch.set_num_threads(used)
    return used
