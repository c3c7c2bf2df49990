"""TAR at very low FAR (1e-4 ... 1e-6) from an all-against-all comparison of labelled embeddings.

A verification file of a few thousand pairs cannot measure TAR@FAR=1e-6: that needs millions of
impostor scores. Scoring every pair of N labelled images gives N(N-1)/2 of them (20,000 images:
~2e8), far too many to hold. Here the similarity matrix is computed one block of rows at a time
(only pairs i < j), genuine scores are all kept (there are few: sum over identities of c(c-1)/2),
and of the impostor scores only the largest ones are kept: TAR at FAR f needs just the
(a+1)-th highest impostor score, a = floor(f x impostors), so the buffer holds the top
max(a)+1 scores and never more than one block of scores exists at once.

The threshold rule is the one of `dcq.eval.verification.tar_at_far_from_scores` ("same" iff score
>= threshold): the best threshold lies just above the (a+1)-th highest impostor score v, and
TAR = fraction of genuine scores > v, so tied impostor scores are never split. TAR is ``None``
where a < 1 (the FAR is below 1/impostors: not measurable on this set).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dcq.errors import DcqError

__all__ = ["LOW_FAR_TARGETS", "pair_counts", "streamed_tar_at_far"]

LOW_FAR_TARGETS = (1e-4, 1e-5, 1e-6)


def pair_counts(labels) -> tuple[int, int]:
    """(genuine pairs, impostor pairs) among all unordered pairs of images with these labels."""
    labels = np.asarray(labels).reshape(-1)
    n = labels.size
    _, counts = np.unique(labels, return_counts=True)
    genuine = int(np.sum(counts.astype(np.int64) * (counts - 1) // 2))
    return genuine, n * (n - 1) // 2 - genuine


def _far_key(far: float) -> str:
    exponent = math.floor(math.log10(far))
    mantissa = far / 10.0 ** exponent
    return f"1e{exponent}" if math.isclose(mantissa, 1.0) else f"{far:g}"


def _check(embeddings, labels, far_targets, block) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(embeddings, dtype=np.float32)
    y = np.asarray(labels).reshape(-1)
    if x.ndim != 2 or x.shape[0] < 2:
        raise DcqError(f"low-FAR scoring needs an (N, d) array of at least 2 embeddings, got shape {x.shape}")
    if y.size != x.shape[0]:
        raise DcqError(f"low-FAR scoring: {x.shape[0]} embeddings but {y.size} labels; give one label per row")
    if not np.all(np.isfinite(x)):
        raise DcqError("low-FAR scoring: the embeddings hold NaN/inf; the model's output is not usable")
    if block < 1:
        raise DcqError(f"low-FAR scoring: block must be >= 1 rows, got {block}")
    for f in far_targets:
        if not 0 < float(f) < 1:
            raise DcqError(f"low-FAR scoring: FAR target {f} must be in (0, 1)")
    return x, y


def streamed_tar_at_far(embeddings, labels, far_targets: Sequence[float] = LOW_FAR_TARGETS,
                        block: int = 512, normalize: bool = True) -> dict:
    """All-against-all verification of labelled embeddings, streamed in blocks of `block` rows.

    Returns ``tar_at_far`` ({"1e-4": TAR or None, ...}), ``impostors_above`` (per FAR: how many
    impostor scores lie above its threshold, a = floor(FAR x impostors): the number of scores
    the measurement rests on), ``thresholds`` (the (a+1)-th highest impostor score per FAR),
    ``impostor_pairs``, ``genuine_pairs`` and the genuine / impostor score means. Cosine
    similarity (rows L2-normalised first unless ``normalize=False``); memory is one block of
    ``block`` x N scores plus the genuine scores and the top impostor scores.
    """
    x, y = _check(embeddings, labels, far_targets, block)
    if normalize:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        if np.any(norms == 0):
            raise DcqError("low-FAR scoring: an embedding is all zeros; its cosine similarity is undefined")
        x = x / norms
    genuine_pairs, impostor_pairs = pair_counts(y)
    allowed = {_far_key(f): math.floor(float(f) * impostor_pairs + 1e-9) for f in far_targets}
    keep = min(impostor_pairs, max(allowed.values(), default=0) + 1)
    top = np.empty(0, dtype=np.float32)  # the `keep` highest impostor scores so far, unordered
    floor = -np.inf  # once `top` is full, only scores above its minimum can enter
    genuine_parts: list[np.ndarray] = []
    impostor_sum = 0.0
    n = x.shape[0]
    for start in range(0, n - 1, block):
        stop = min(n, start + block)
        scores = x[start:stop] @ x[start:].T  # rows start..stop against columns start..n
        rows = np.arange(start, stop)[:, None]
        cols = np.arange(start, n)[None, :]
        upper = cols > rows
        same = y[start:stop, None] == y[None, start:]
        genuine_parts.append(scores[upper & same])
        impostor_mask = upper & ~same
        impostor_sum += float(scores[impostor_mask].sum(dtype=np.float64))
        candidates = scores[impostor_mask & (scores >= floor)]
        if candidates.size:
            top = np.concatenate([top, candidates])
            if top.size > keep:
                top = np.partition(top, top.size - keep)[top.size - keep:]
            if top.size == keep:
                floor = float(top.min())
    genuine = np.concatenate(genuine_parts) if genuine_parts else np.empty(0, dtype=np.float32)
    top = np.sort(top)[::-1]  # descending: top[a] is the (a+1)-th highest impostor score
    tar: dict[str, float | None] = {}
    thresholds: dict[str, float | None] = {}
    for key, a in allowed.items():
        if a < 1 or genuine.size == 0 or impostor_pairs == 0:
            tar[key], thresholds[key] = None, None
        elif a >= impostor_pairs:
            tar[key], thresholds[key] = 1.0, None
        else:
            v = float(top[a])
            tar[key], thresholds[key] = float(np.mean(genuine > v)), v
    return {"tar_at_far": tar, "impostors_above": allowed, "thresholds": thresholds,
            "impostor_pairs": int(impostor_pairs), "genuine_pairs": int(genuine_pairs),
            "genuine_mean": float(genuine.mean()) if genuine.size else None,
            "impostor_mean": impostor_sum / impostor_pairs if impostor_pairs else None}
