"""What a resumed run may change, and what it may not.

A training checkpoint continues one run: its weights, head state (the queue and its labels),
optimiser state, sampler position and identity count belong to one dataset and one model shape.
`--resume` therefore refuses, naming the key, a different dataset (its image or identity count; a
set that only moved, e.g. copied to a local disk, is accepted with a note) or a config key that
changes the shape or meaning of the saved state. The
optimiser's hyper-parameters (lr, sgd_momentum, weight_decay) may change: they are applied to the
restored optimiser, and the change is logged. So may the loss recipe (scale, margin, references,
generator momentum, in-batch negatives, ...), with one note per changed key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dcq.errors import DcqError

# Config keys whose value is baked into the saved state (model, head, optimiser, sampler order).
STATE_KEYS = {
    "backbone": "the model",
    "embedding_size": "the model",
    "image_size": "the model",
    "head": "the head",  # and the keys the head's spec names (DCQ: its queue's length)
    "optimizer": "the optimiser state",
    "sampling": "the sampler position",
    "seed": "the sampler position",
}
# Keys of the loss a resumed run may change (the saved state stays valid), each change noted: a
# config that leaves them to the defaults picks up new defaults after an upgrade, never silently.
RECIPE_KEYS = ("scale", "margin", "margin_type", "num_references", "generator_momentum", "in_batch_negatives",
               "dedup", "sample_rate")
# Optimiser hyper-parameters a resumed run applies: config key -> optimiser param-group key.
HYPERPARAMETERS = {"lr": "lr", "sgd_momentum": "momentum", "weight_decay": "weight_decay"}


def dataset_fingerprint(path: str, source) -> dict[str, Any]:
    return {"path": os.path.abspath(path), "images": len(source), "identities": int(source.num_identities)}


def saved_config(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's config with current key names (checkpoints before the renames use old ones)."""
    from dcq.train.config import canonical_keys

    return canonical_keys(dict(ckpt.get("config") or {}), "checkpoint")


def check_compatible(where: Path, ckpt: dict[str, Any], cfg_values: dict[str, Any],
                     fingerprint: dict[str, Any]) -> list[str]:
    """Raise DcqError naming the first config key or dataset property that differs; returns notes
    (a training set that moved but has the same counts is accepted with a note)."""
    from dcq.heads.registry import head_spec

    saved = saved_config(ckpt)
    # the head's own keys after "head" itself: a changed head is named first
    for key, what in {**STATE_KEYS, **head_spec(cfg_values["head"]).resume_keys}.items():
        if key in saved and saved[key] != cfg_values.get(key):
            raise DcqError(f"--resume {where}: checkpoint has {key}={saved[key]!r}, config has "
                           f"{cfg_values.get(key)!r}, which changes {what}; resume with the same {key}")
    notes = [f"resumed with {key}={cfg_values.get(key)!r} (the checkpoint trained with {saved[key]!r})"
             for key in RECIPE_KEYS if key in saved and saved[key] != cfg_values.get(key)]
    old = ckpt.get("dataset")  # checkpoints before the fingerprint have none
    if not old:
        return notes
    for key in ("images", "identities"):
        if old.get(key) != fingerprint[key]:
            raise DcqError(
                f"--resume {where}: the training set differs ({key}: checkpoint {old.get(key)!r}, now "
                f"{fingerprint[key]!r}; checkpoint data {old.get('path')}, now {fingerprint['path']}); the queue, "
                "sampler position and identity count belong to the checkpoint's data: resume on that data"
            )
    if old.get("path") != fingerprint["path"]:
        notes.append(f"training set moved: checkpoint {old.get('path')}, now {fingerprint['path']} "
                     f"(same {fingerprint['images']} images and {fingerprint['identities']} identities)")
    return notes


def apply_hyperparameters(optimizer, scheduler, cfg_values: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    """Set changed lr / sgd_momentum / weight_decay on a restored optimiser (and the schedule's base
    lr); returns one line per change."""
    changes = []
    for key, group_key in HYPERPARAMETERS.items():
        new, old = cfg_values.get(key), saved.get(key)
        if old is None or new == old or not any(group_key in g for g in optimizer.param_groups):
            continue
        if key == "lr":
            ratio = new / old
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * ratio
                if "initial_lr" in group:
                    group["initial_lr"] = group["initial_lr"] * ratio
            if scheduler is not None:
                scheduler.base_lrs = [lr * ratio for lr in scheduler.base_lrs]
                scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        else:
            for group in optimizer.param_groups:
                if group_key in group:
                    group[group_key] = new
        changes.append(f"{key} {old} -> {new}")
    return changes
