"""The probe set of a synthetic dataset: held-out images of training identities.

Used for long-tail evaluation: identification accuracy of a probe as a function of how many
training images its identity had (``train_counts``), the question DCQ's paper asks of tail classes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dcq.errors import DcqError

__all__ = ["ProbeSet", "read_probe_set"]


@dataclass
class ProbeSet:
    images: list[bytes]        # encoded images
    labels: np.ndarray         # int64 training label of each probe's identity
    train_counts: np.ndarray   # int64 number of training images of that identity

    def __len__(self) -> int:
        return len(self.images)


def read_probe_set(dataset_dir) -> ProbeSet:
    """Read ``probe.rec``/``probe.idx`` and the per-identity training counts from ``stats.json``."""
    from dcq.data.recordio import FaceRecordIO

    d = Path(dataset_dir)
    stats_path = d / "stats.json"
    if not (d / "probe.rec").is_file():
        raise DcqError(f"{d}: no probe.rec; probe sets come with datasets written by `dcq synth`")
    if not stats_path.is_file():
        raise DcqError(f"{stats_path}: not found; the dataset is incomplete — re-run `dcq synth {d}`")
    try:
        stats = json.loads(stats_path.read_text())
        counts = np.asarray(stats["train_images_per_identity"], dtype=np.int64)
    except (ValueError, KeyError, TypeError) as exc:
        raise DcqError(f"{stats_path}: unreadable or lacks train_images_per_identity ({exc}); re-run `dcq synth`") \
            from None
    ds = FaceRecordIO(d / "probe.rec", relabel=False)  # keep the training labels as stored
    labels = ds.raw_labels.astype(np.int64)
    if labels.size and labels.max() >= counts.size:
        i = int(np.argmax(labels >= counts.size))
        raise DcqError(
            f"{d / 'probe.rec'}: probe {i} has label {labels[i]} but stats.json lists {counts.size} training "
            "identities; the probe set and stats.json come from different runs — re-run `dcq synth`"
        )
    images = [ds.image_bytes(i) for i in range(len(ds))]
    return ProbeSet(images=images, labels=labels, train_counts=counts[labels])
