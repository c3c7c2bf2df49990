"""A checksum of a checkpoint's payload, so that damaged bytes are reported instead of loaded.

The digest covers every tensor's dtype, shape and bytes and every other value's ``repr``, walked in
the payload's own order; it is the same before ``torch.save`` and after ``torch.load`` of an intact
file, on any device the tensors are loaded to.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

ALGORITHM = "sha256"


def payload_digest(payload: Any) -> str:
    h = hashlib.new(ALGORITHM)
    _feed(h, payload)
    return h.hexdigest()


def _feed(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key, value in obj.items():
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())  # a tuple may come back as a list: same digest
        for value in obj:
            _feed(h, value)
    else:
        h.update(f"S{type(obj).__name__}:{obj!r};".encode())
