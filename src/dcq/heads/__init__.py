"""Heads: DCQ and the two classification baselines, behind one interface (see `base.Head`)."""

from dcq.heads.base import Head, HeadOutput
from dcq.heads.dcq import DynamicClassQueue
from dcq.heads.full_fc import FullFC
from dcq.heads.partial_fc import PartialFC

__all__ = ["Head", "HeadOutput", "DynamicClassQueue", "FullFC", "PartialFC"]
