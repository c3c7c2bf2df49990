"""Pair verification: the standard 10-fold accuracy protocol and TAR at fixed FAR.

The protocol (what ``dcq eval --json`` reports: similarity, contiguous folds, the exact threshold
sweep and its tie-breaking, accuracy / std / threshold, TAR@FAR and when it is ``None``) is defined
once, in ``docs/evaluation.md`` ("Verification"); this module implements that text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dcq.errors import DcqError

__all__ = [
    "DEFAULT_FAR_TARGETS",
    "best_threshold",
    "cosine_scores",
    "far_key",
    "roc_curve_points",
    "tar_at_far",
    "verify_pairs",
    "verify_scores",
]

DEFAULT_FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def far_key(far: float) -> str:
    """1e-4 -> "1e-4" (the JSON key); other values keep a short general form ("5e-3", "0.25")."""
    far = float(far)
    if far > 0:
        exp = math.floor(math.log10(far))
        mant = far / 10.0**exp
        if abs(mant - round(mant)) < 1e-9:
            m = round(mant)
            return f"1e{exp}" if m == 1 else f"{m}e{exp}"
    return f"{far:g}"


def _as_numpy(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype == object:
        raise DcqError(f"{name} must be a numeric array, got an object array")
    return arr


def l2_normalise(x, dtype=np.float32) -> np.ndarray:
    """Rows of `x` (as `dtype`) divided by their L2 norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=dtype)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cosine_scores(emb1, emb2) -> np.ndarray:
    """Row-wise cosine similarity (float64) of two (P, d) arrays; rows are L2-normalised first."""
    a = _as_numpy(emb1, "emb1").astype(np.float64)
    b = _as_numpy(emb2, "emb2").astype(np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise DcqError(f"emb1 and emb2 must both be (P, d) arrays of one shape, got {a.shape} and {b.shape}")
    return np.sum(l2_normalise(a, np.float64) * l2_normalise(b, np.float64), axis=1)


def _check_scores(scores, issame) -> tuple[np.ndarray, np.ndarray]:
    s = _as_numpy(scores, "scores").astype(np.float64).reshape(-1)
    y = _as_numpy(issame, "issame").astype(bool).reshape(-1)
    if s.shape != y.shape:
        raise DcqError(f"{s.size} scores but {y.size} issame flags; pass one flag per pair")
    if not np.all(np.isfinite(s)):
        raise DcqError("similarity scores contain NaN or inf; the embeddings are not finite (diverged model?)")
    return s, y


def best_threshold(scores, issame) -> tuple[float, int]:
    """The exact accuracy-maximising threshold on (scores, issame) and the number it gets right.

    Rule: "same" iff score >= threshold. Ties in accuracy go to the highest threshold.
    """
    s, y = _check_scores(scores, issame)
    if s.size == 0:
        raise DcqError("cannot choose a threshold from zero pairs")
    uniq, inv = np.unique(s, return_inverse=True)  # ascending
    pos = np.bincount(inv, weights=y, minlength=uniq.size)
    neg = np.bincount(inv, weights=~y, minlength=uniq.size)
    # candidate i (0..m) accepts the scores >= uniq[i]; candidate m accepts nothing
    tp = np.concatenate([np.cumsum(pos[::-1])[::-1], [0.0]])  # positives with score >= uniq[i]
    tn = np.concatenate([[0.0], np.cumsum(neg)])  # negatives with score < uniq[i]
    correct = np.rint(tp + tn).astype(np.int64)
    i = int(np.flatnonzero(correct == correct.max())[-1])  # highest threshold among the best
    m = uniq.size
    if i == 0:
        thr = float(np.nextafter(uniq[0], -np.inf))
    elif i == m:
        thr = float(np.nextafter(uniq[-1], np.inf))
    else:
        lo, hi = uniq[i - 1], uniq[i]
        mid = lo + (hi - lo) / 2.0
        thr = float(mid if lo < mid <= hi else hi)
    return thr, int(correct[i])


def _fold_slices(n: int, n_folds: int) -> list[np.ndarray]:
    return np.array_split(np.arange(n), n_folds)


def tar_at_far(scores, issame, far_targets: Sequence[float] = DEFAULT_FAR_TARGETS) -> dict[str, float | None]:
    """{"1e-3": TAR, ...}: best TAR with empirical FAR <= target over all thresholds.

    ``None`` when the target is below 1/negatives (not measurable) or a class is empty.
    """
    s, y = _check_scores(scores, issame)
    return tar_at_far_from_scores(s[y], s[~y], far_targets)


def tar_at_far_from_scores(genuine, impostor, far_targets: Sequence[float] = DEFAULT_FAR_TARGETS
                           ) -> dict[str, float | None]:
    """Exact TAR at each FAR from separate genuine / impostor scores ("same" iff score >= threshold).

    With a = floor(FAR x impostors) allowed false accepts, the best threshold lies just above the
    (a+1)-th highest impostor score v, so TAR = fraction of genuine scores > v (found with a
    partial sort, so large impostor sets are cheap). Any lower threshold accepts more than a
    impostors; this is the best point of the exact ROC curve with at most a false accepts.
    """
    gen = np.asarray(genuine, dtype=np.float64).reshape(-1)
    imp = np.asarray(impostor, dtype=np.float64).reshape(-1)
    out: dict[str, float | None] = {far_key(f): None for f in far_targets}
    if gen.size == 0 or imp.size == 0:
        return out
    for f in far_targets:
        allowed = math.floor(float(f) * imp.size + 1e-9)
        if allowed < 1:
            continue
        if allowed >= imp.size:
            out[far_key(f)] = 1.0
            continue
        k = imp.size - allowed - 1  # index of the (allowed+1)-th largest in ascending order
        v = np.partition(imp, k)[k]
        out[far_key(f)] = float(np.mean(gen > v))
    return out


def verify_scores(scores, issame, n_folds: int = 10,
                  far_targets: Sequence[float] = DEFAULT_FAR_TARGETS) -> dict:
    """The protocol of the module docstring on precomputed similarity scores."""
    s, y = _check_scores(scores, issame)
    n_folds = int(n_folds)
    if n_folds < 2:
        raise DcqError(f"n_folds must be >= 2 (a threshold is chosen on the other folds), got {n_folds}")
    if s.size < n_folds:
        raise DcqError(f"{s.size} pairs cannot be split into {n_folds} folds; use a .bin with >= {n_folds} pairs")
    accs, thrs = [], []
    everything = np.arange(s.size)
    for test in _fold_slices(s.size, n_folds):
        train = np.setdiff1d(everything, test, assume_unique=True)
        thr, _ = best_threshold(s[train], y[train])
        accs.append(float(np.mean((s[test] >= thr) == y[test])))
        thrs.append(thr)
    return {
        "accuracy": float(np.mean(accs)),
        "accuracy_std": float(np.std(accs)),
        "threshold": float(np.mean(thrs)),
        "pairs": int(s.size),
        "tar_at_far": tar_at_far(s, y, far_targets),
    }


def verify_pairs(emb1, emb2, issame, n_folds: int = 10,
                 far_targets: Sequence[float] = DEFAULT_FAR_TARGETS) -> dict:
    """Verification metrics of pairs (emb1[i], emb2[i]): exactly the keys ``accuracy``,
    ``accuracy_std``, ``threshold``, ``pairs``, ``tar_at_far`` (see the module docstring)."""
    scores = cosine_scores(emb1, emb2)
    return verify_scores(scores, issame, n_folds=n_folds, far_targets=far_targets)


def roc_curve_points(scores, issame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of every distinct threshold (sklearn, no points dropped)."""
    from sklearn.metrics import roc_curve

    s, y = _check_scores(scores, issame)
    if y.all() or not y.any():
        raise DcqError("a ROC curve needs both same and different pairs; the issame flags hold only one kind")
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    return fpr, tpr, thr
