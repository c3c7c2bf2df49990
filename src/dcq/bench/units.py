"""Counts and sizes on the command line: parsing (1e4, 8G) and printing (1.5 MiB)."""

from __future__ import annotations

import math

from dcq.errors import DcqError
from dcq.resources import format_bytes  # noqa: F401  (its home is below training and benchmarks)


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
