"""Long-tail evaluation: how well identities with few training images are recognised.

DCQ's claim is that a dynamic class queue trains on millions of identities, most of them with a
handful of images. This report asks, per bucket of *training images per identity*, how well
held-out probe images of those training identities are recognised:

- gallery: one vector per training identity, its *centre* = the mean of the (flip-test,
  L2-normalised) embeddings of that identity's training images, L2-normalised again;
  identities with no training image have no centre;
- rank-1: a probe is a hit when its own identity's centre scores strictly higher than every other
  centre (ties count as misses; `dcq.eval.identification.match_ranks`);
- TAR@FAR: genuine scores = probe vs its own centre, impostor scores = probe vs every other
  centre, pooled over the probes of the bucket; TAR@FAR as for verification
  (`dcq.eval.verification.tar_at_far_from_scores`, defined in docs/evaluation.md). When a bucket has more
  than ``max_impostor_pairs`` impostor pairs, its impostors are a fixed random subset of centres
  (seeded, the same for every probe of the bucket) and the row says ``impostors_sampled: true``.

Buckets are inclusive ranges ``(lo, hi)``; ``hi=None`` is open-ended. A final row ``all`` pools
every probe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dcq.data.synth.profiles import bucket_name
from dcq.errors import DcqError
from dcq.eval.identification import match_ranks
from dcq.eval.verification import l2_normalise, tar_at_far_from_scores

__all__ = [
    "DEFAULT_BUCKETS",
    "LONGTAIL_FAR_TARGETS",
    "ProbeGallery",
    "bucket_name",
    "embed_probe_gallery",
    "identity_centres",
    "longtail_from_embeddings",
    "longtail_metrics",
    "longtail_report",
    "rows_to_markdown",
    "tar_at_far_from_scores",
]

DEFAULT_BUCKETS: tuple[tuple[int, int | None], ...] = ((1, 2), (3, 9), (10, 49), (50, None))
LONGTAIL_FAR_TARGETS = (1e-4, 1e-3, 1e-2, 1e-1)
MAX_IMPOSTOR_PAIRS = 20_000_000
_PROBE_BLOCK = 1024


def _check_buckets(buckets) -> list[tuple[int, int | None]]:
    out = []
    for b in buckets:
        try:
            lo, hi = b
            lo = int(lo)
            hi = None if hi is None else int(hi)
        except (TypeError, ValueError):
            raise DcqError(f"bad long-tail bucket {b!r}; use (lo, hi) pairs such as (3, 9) or (50, None)") from None
        if lo < 1 or (hi is not None and hi < lo):
            raise DcqError(f"bad long-tail bucket {b!r}: need 1 <= lo <= hi")
        out.append((lo, hi))
    if not out:
        raise DcqError("no long-tail buckets given")
    return out


def identity_centres(train_emb, train_labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centres (G, d) float32, their labels (G,), image counts (G,)) for every label present."""
    emb = l2_normalise(train_emb)
    labels = np.asarray(train_labels).reshape(-1).astype(np.int64)
    if len(labels) != len(emb):
        raise DcqError(f"{len(emb)} training embeddings but {len(labels)} labels")
    uniq, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
    sums = np.zeros((len(uniq), emb.shape[1]), dtype=np.float64)
    np.add.at(sums, inv, emb)
    return l2_normalise(sums), uniq, counts


def _impostor_scores(probes: np.ndarray, probe_labels: np.ndarray, centres: np.ndarray,
                     centre_labels: np.ndarray, cap: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """Scores of probes against other identities' centres (all, or a seeded subset above ``cap``)."""
    n, g = len(probes), len(centres)
    sampled = n * (g - 1) > cap
    if sampled:
        m = max(1, min(g, cap // max(n, 1)))
        cols = np.sort(rng.choice(g, size=m, replace=False))
        centres, centre_labels = centres[cols], centre_labels[cols]
    parts = []
    for p0 in range(0, n, _PROBE_BLOCK):
        s = probes[p0:p0 + _PROBE_BLOCK] @ centres.T
        other = probe_labels[p0:p0 + _PROBE_BLOCK, None] != centre_labels[None, :]
        parts.append(s[other])
    return (np.concatenate(parts) if parts else np.zeros(0, np.float32)), sampled


def longtail_metrics(centres, centre_labels, probe_emb, probe_labels, probe_counts,
                     buckets: Sequence[tuple[int, int | None]] = DEFAULT_BUCKETS,
                     far_targets: Sequence[float] = LONGTAIL_FAR_TARGETS,
                     max_impostor_pairs: int = MAX_IMPOSTOR_PAIRS, seed: int = 0,
                     centre_counts=None) -> list[dict]:
    """Rows of the long-tail report from identity centres and probe embeddings (module docstring).

    ``probe_counts[i]`` = training images of probe i's identity (decides its bucket);
    ``centre_counts`` (optional) = training images per centre, for the ``identities`` column.
    """
    buckets = _check_buckets(buckets)
    centres = l2_normalise(centres)
    c_lab = np.asarray(centre_labels).reshape(-1).astype(np.int64)
    probes = l2_normalise(probe_emb)
    p_lab = np.asarray(probe_labels).reshape(-1).astype(np.int64)
    p_cnt = np.asarray(probe_counts).reshape(-1).astype(np.int64)
    if not (len(probes) == len(p_lab) == len(p_cnt)):
        raise DcqError(f"{len(probes)} probe embeddings, {len(p_lab)} labels, {len(p_cnt)} counts: must match")
    if len(c_lab) != len(centres) or len(np.unique(c_lab)) != len(c_lab):
        raise DcqError("centre labels must be one distinct label per centre")
    if len(probes) == 0:
        raise DcqError("the probe set is empty; the long-tail report needs held-out images of training identities")
    ranks = match_ranks(probes, p_lab, centres, c_lab)
    pos = {int(lab): i for i, lab in enumerate(c_lab)}
    own = centres[[pos[int(lab)] for lab in p_lab]]
    genuine = np.sum(probes * own, axis=1)
    rng = np.random.default_rng(seed)
    c_cnt = None if centre_counts is None else np.asarray(centre_counts).reshape(-1)

    def row(name, lo, hi, mask, identities):
        n = int(mask.sum())
        imp, sampled = _impostor_scores(probes[mask], p_lab[mask], centres, c_lab, max_impostor_pairs, rng)
        return {
            "bucket": name, "min_images": lo, "max_images": hi, "identities": identities, "probes": n,
            "rank1": float(np.mean(ranks[mask] == 1)) if n else None,
            "tar_at_far": tar_at_far_from_scores(genuine[mask], imp, far_targets),
            "impostor_pairs": int(imp.size), "impostors_sampled": bool(sampled),
        }

    def n_ids(lo, hi):
        if c_cnt is None:
            sel = (p_cnt >= lo) & (p_cnt <= (hi if hi is not None else np.iinfo(np.int64).max))
            return len(np.unique(p_lab[sel]))
        return int(np.sum((c_cnt >= lo) & (c_cnt <= (hi if hi is not None else np.iinfo(np.int64).max))))

    rows = []
    for lo, hi in buckets:
        mask = (p_cnt >= lo) & (p_cnt <= (hi if hi is not None else np.iinfo(np.int64).max))
        rows.append(row(bucket_name(lo, hi), lo, hi, mask, n_ids(lo, hi)))
    all_ids = len(c_lab) if c_cnt is not None else len(np.unique(p_lab))
    rows.append(row("all", 1, None, np.ones(len(probes), dtype=bool), all_ids))
    return rows


def longtail_from_embeddings(train_emb, train_labels, probe_emb, probe_labels,
                             buckets: Sequence[tuple[int, int | None]] = DEFAULT_BUCKETS,
                             far_targets: Sequence[float] = LONGTAIL_FAR_TARGETS,
                             max_impostor_pairs: int = MAX_IMPOSTOR_PAIRS, seed: int = 0) -> list[dict]:
    """Long-tail rows from raw training and probe embeddings; bucket = training images of the identity."""
    centres, labels, counts = identity_centres(train_emb, train_labels)
    p_lab = np.asarray(probe_labels).reshape(-1).astype(np.int64)
    idx = np.searchsorted(labels, p_lab)
    idx = np.minimum(idx, len(labels) - 1)
    if np.any(labels[idx] != p_lab):
        bad = int(p_lab[labels[idx] != p_lab][0])
        raise DcqError(f"probe identity {bad} has no training image; probes must be of training identities")
    return longtail_metrics(centres, labels, probe_emb, p_lab, counts[idx], buckets, far_targets,
                            max_impostor_pairs, seed, centre_counts=counts)


@dataclass
class ProbeGallery:
    """Embedded probe set and identity centres of one dataset (what the long-tail report and
    identification with distractors both start from)."""

    centres: np.ndarray  # (G, d) float32, L2-normalised
    centre_labels: np.ndarray  # (G,) training label of each centre
    centre_counts: np.ndarray  # (G,) training images of each centre's identity
    probe_emb: np.ndarray  # (P, d) float32, L2-normalised
    probe_labels: np.ndarray  # (P,)
    probe_counts: np.ndarray  # (P,) training images of each probe's identity
    train_images: int


def embed_probe_gallery(encoder, dataset_dir, image_size: int | None = None, device="cpu",
                        batch_size: int = 256, flip: bool = True, progress: bool = False) -> ProbeGallery:
    """Embed a dataset's training images (streamed into per-identity sums, never all held at once)
    and its probe set; labels and counts are checked against each other before any embedding.
    ``encoder``: a `dcq.encoders.FaceEncoder` (checkpoint or ONNX) or a PyTorch module."""
    from dcq.data import open_dataset, read_probe_set
    from dcq.encoders import as_encoder

    model = as_encoder(encoder, device, batch_size, flip, image_size)
    dataset_dir = Path(dataset_dir)
    ds = open_dataset(dataset_dir)
    probe = read_probe_set(dataset_dir)
    labels = np.asarray(ds.labels).astype(np.int64)
    if len(labels) == 0:
        raise DcqError(f"{dataset_dir}: the training set is empty")
    n_ids = max(int(ds.num_identities), int(labels.max()) + 1)
    counts = np.bincount(labels, minlength=n_ids)
    present = np.flatnonzero(counts > 0)
    p_lab = np.asarray(probe.labels).astype(np.int64).reshape(-1)
    if len(p_lab) == 0:
        raise DcqError(f"{dataset_dir}: the probe set is empty; re-create the dataset with probes "
                       "(`dcq synth` writes probe.rec)")
    if p_lab.min() < 0 or p_lab.max() >= n_ids or np.any(counts[p_lab] == 0):
        raise DcqError(f"{dataset_dir}: probe labels do not match training identities; probe.rec and "
                       "train.rec must come from the same `dcq synth` run")
    declared = np.asarray(probe.train_counts).astype(np.int64).reshape(-1)
    if declared.shape == p_lab.shape and np.any(declared != counts[p_lab]):
        raise DcqError(f"{dataset_dir}: the probe set's training-image counts disagree with the training "
                       "set; probe.rec and train.rec must come from the same `dcq synth` run")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(labels) + len(p_lab), desc="long-tail", unit="img", dynamic_ncols=True)
    try:
        sums = None
        step = max(1, int(model.batch_size)) * 4
        for start in range(0, len(labels), step):
            idx = range(start, min(len(labels), start + step))
            emb = model.embed([ds.image_bytes(i) for i in idx])
            if sums is None:
                sums = np.zeros((n_ids, emb.shape[1]), dtype=np.float64)
            np.add.at(sums, labels[start:start + len(idx)], emb.astype(np.float64))
            if bar is not None:
                bar.update(len(idx))
        probe_emb = model.embed(probe.images)
        if bar is not None:
            bar.update(len(p_lab))
    finally:
        if bar is not None:
            bar.close()
    return ProbeGallery(centres=l2_normalise(sums[present]), centre_labels=present,
                        centre_counts=counts[present], probe_emb=probe_emb, probe_labels=p_lab,
                        probe_counts=counts[p_lab], train_images=len(labels))


def longtail_report(encoder, dataset_dir, image_size: int | None = None,
                    buckets: Sequence[tuple[int, int | None]] = DEFAULT_BUCKETS, device="cpu",
                    batch_size: int = 256, flip: bool = True,
                    far_targets: Sequence[float] = LONGTAIL_FAR_TARGETS, progress: bool = False,
                    gallery: ProbeGallery | None = None) -> dict:
    """The long-tail rows of a dataset's probe set: ``{"rows": [...], "identities", "train_images",
    "probes", "gallery"}``. Pass ``gallery`` (from `embed_probe_gallery`) to skip embedding."""
    g = gallery if gallery is not None else embed_probe_gallery(
        encoder, dataset_dir, image_size, device=device, batch_size=batch_size, flip=flip, progress=progress)
    rows = longtail_metrics(g.centres, g.centre_labels, g.probe_emb, g.probe_labels, g.probe_counts, buckets,
                            far_targets, centre_counts=g.centre_counts)
    return {
        "rows": rows,
        "identities": len(g.centre_labels),
        "train_images": g.train_images,
        "probes": len(g.probe_labels),
        "gallery": "per identity: L2-normalised mean of its training images' flip-test embeddings",
    }


def rows_to_markdown(rows: list[dict]) -> str:
    """The long-tail rows as a markdown table (rank-1 and each TAR@FAR; n/a where not measurable)."""
    if not rows:
        return ""
    from dcq.tables import fmt_metric, markdown_table

    fars = list(rows[0]["tar_at_far"])
    head = ["training images / identity", "identities", "probes", "rank-1"] + [f"TAR@FAR={k}" for k in fars]
    return markdown_table(head, ([r["bucket"], str(r["identities"]), str(r["probes"]), fmt_metric(r["rank1"])]
                                 + [fmt_metric(r["tar_at_far"].get(k)) for k in fars] for r in rows))
