"""dcq: face-recognition training with a Dynamic Class Queue (Li et al., CVPR 2021).

The method lives in `heads/dcq.py` (the head), `heads/queue.py` (the class queue) and `momentum.py`
(the weight generator); `FullFC` and `PartialFC` are the baselines behind the same head interface.

Every public name loads on first use, so `import dcq`, `dcq --help` and `import dcq.data` do not
import torch, and importing dcq changes nothing outside it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dcq.errors import DcqError
from dcq.lazy import lazy_attributes

__version__ = "0.1.0"

_EXPORTS = {
    "ClassQueue": "dcq.heads.queue",
    "DynamicClassQueue": "dcq.heads",
    "FullFC": "dcq.heads",
    "PartialFC": "dcq.heads",
    "HeadOutput": "dcq.heads",
    "MomentumEncoder": "dcq.momentum",
}
_SUBPACKAGES = ("data", "eval", "models")

__all__ = ["ClassQueue", "DcqError", "DynamicClassQueue", "FullFC", "HeadOutput", "MomentumEncoder", "PartialFC",
           "data", "eval", "models"]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from dcq import data, eval, models
    from dcq.heads import DynamicClassQueue, FullFC, HeadOutput, PartialFC
    from dcq.heads.queue import ClassQueue
    from dcq.momentum import MomentumEncoder

_names, _dir = lazy_attributes(__name__, _EXPORTS)


def __getattr__(name: str):
    """`dcq.data`, `dcq.eval`, `dcq.models` and the classes above load on first use."""
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f"dcq.{name}")
    return _names(name)


def __dir__():
    return sorted(set(_dir()) | set(_SUBPACKAGES))
