"""Which autocast dtype is active: the layers that stay in float32 under AMP ask it here."""

from __future__ import annotations

import torch


def active_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force for `device_type` ("cuda", "cpu", ...), or None (off, or a device
    such as "meta" that autocast does not know)."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
    except RuntimeError:
        return None
    return torch.get_autocast_dtype(device_type)
