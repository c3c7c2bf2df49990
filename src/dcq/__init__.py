"""dcq: face-recognition training with a Dynamic Class Queue (Li et al., CVPR 2021).

The method lives in `heads/dcq.py` (the head), `queue.py` (the class queue) and `momentum.py` (the
weight generator); `FullFC` and `PartialFC` are the baselines behind the same head interface.
"""

import importlib

from dcq.errors import DcqError
from dcq.heads import DynamicClassQueue, FullFC, HeadOutput, PartialFC
from dcq.momentum import MomentumEncoder
from dcq.queue import ClassQueue

__version__ = "0.1.0"

__all__ = [
    "ClassQueue",
    "DynamicClassQueue",
    "FullFC",
    "PartialFC",
    "HeadOutput",
    "MomentumEncoder",
    "DcqError",
    "data",
    "eval",
    "models",
]


def __getattr__(name: str):
    """`dcq.data`, `dcq.eval`, `dcq.models` load on first use, so `import dcq` stays light."""
    if name in ("data", "eval", "models"):
        return importlib.import_module(f"dcq.{name}")
    raise AttributeError(f"module 'dcq' has no attribute {name!r}")
