"""Checkpoint files: one `torch.save`d dict, written atomically, loaded with `weights_only=True`,
and the evaluation encoder built from one.

Model I/O, below both training and evaluation: `dcq.train` writes and resumes these files (their
layout is documented where it is written, `dcq.train.state`), and `dcq.eval`, `dcq export` and the
demo read them; neither side imports the other for it. Every file carries ``format``, ``version``
and a ``checksum`` of its contents, so a damaged file is refused instead of half-read.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dcq.atomic import atomic_write
from dcq.checksum import ALGORITHM, payload_digest
from dcq.errors import DcqError

FORMAT = "dcq-checkpoint"
VERSION = 1


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write `payload` to `path` atomically: a temporary file in the same folder, fsync, rename.

    A crash at any point leaves either the previous file or the new one, never a torn file.
    """
    data = {"format": FORMAT, "version": VERSION, **payload}
    data["checksum"] = {"algorithm": ALGORITHM, "digest": payload_digest(data)}
    return atomic_write(path, lambda f: torch.save(data, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a dcq checkpoint without executing code (`weights_only=True`); clear error otherwise.

    On the host the file is memory-mapped: ranks resuming a sharded head each read the full N-row
    tensors, and mapped pages are shared through the page cache instead of copied into every process."""
    path = Path(path)
    if not path.is_file():
        raise DcqError(f"checkpoint {path} does not exist; pass a .pt file written by `dcq train`")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True, mmap=str(map_location) == "cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights only" in first.lower() or "weights_only" in first:
            # torch's text goes on to suggest weights_only=False, i.e. running the file's code: never that.
            first = "it holds objects other than tensors and plain containers, so it was not loaded"
        raise DcqError(f"{path} is not a loadable dcq checkpoint ({first[:200]})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DcqError(f"{path} is not a dcq checkpoint (no 'format: {FORMAT}' entry); was it written by dcq?")
    if int(data.get("version", 0)) > VERSION:
        raise DcqError(f"{path} has checkpoint version {data['version']}; this dcq reads up to {VERSION}")
    checksum = data.pop("checksum", None)  # checkpoints written before checksums load without one
    if checksum is not None:
        digest = checksum.get("digest") if isinstance(checksum, dict) else None
        if digest != payload_digest(data):
            raise DcqError(f"{path} is damaged: its contents do not match the checksum stored when it was "
                           "written; use another checkpoint (e.g. an earlier step_*.pt)")
    return data


def build_eval_encoder(ckpt: dict[str, Any], prefer: str = "weight_generator") -> tuple[nn.Module, dict]:
    """The encoder to evaluate, in eval mode: the weight generator when the checkpoint has one (DCQ,
    as in the paper), else the feature extractor. Returns (module, info)."""
    from dcq.models import get_backbone

    model = ckpt.get("model") or {}
    try:
        name, dim, size = model["backbone"], int(model["embedding_size"]), int(model["image_size"])
    except (KeyError, TypeError):
        raise DcqError("checkpoint has no usable 'model' entry (backbone, embedding_size, image_size)") from None
    which = prefer if ckpt.get(prefer) is not None else "feature_extractor"
    if ckpt.get(which) is None:
        raise DcqError(f"checkpoint holds neither '{prefer}' nor 'feature_extractor' weights")
    try:
        encoder = get_backbone(name, embedding_size=dim, image_size=size)
    except ValueError as exc:  # unknown backbone or an image size it cannot take
        raise DcqError(f"checkpoint's model entry cannot be built: {exc}") from None
    try:
        encoder.load_state_dict(ckpt[which])
    except RuntimeError as exc:
        raise DcqError(f"checkpoint weights do not fit backbone {name}: {str(exc).splitlines()[0]}") from None
    encoder.eval()
    info = {"which": which, "backbone": name, "embedding_size": dim, "image_size": size}
    return encoder, info
