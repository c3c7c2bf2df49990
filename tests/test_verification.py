"""10-fold verification and TAR@FAR, pinned against a brute-force computation written here.

The reference below is deliberately naive: it tries every candidate threshold (each distinct
score with "same iff score >= t", plus +inf), loops over folds built by hand, and sweeps FAR with
explicit counts. It shares no code with dcq.eval.verification.
"""

import math
import statistics

import numpy as np
import pytest

from dcq.errors import DcqError
from dcq.eval import verify_pairs
from dcq.eval.verification import (
    DEFAULT_FAR_TARGETS,
    best_threshold,
    far_key,
    roc_curve_points,
    tar_at_far,
    verify_scores,
)

KEYS = {"accuracy", "accuracy_std", "threshold", "pairs", "tar_at_far"}
FAR_KEYS = ["1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"]


# --------------------------------------------------------------------------- reference
def ref_best_threshold(scores, labels):
    """Highest threshold among those with the most correct decisions; reported as a midpoint."""
    candidates = sorted(set(scores)) + [math.inf]
    best_correct, best_t = -1, None
    for t in candidates:  # ascending, so ">=" keeps the highest of equally good thresholds
        correct = sum(1 for s, y in zip(scores, labels) if (s >= t) == y)
        if correct >= best_correct:
            best_correct, best_t = correct, t
    if best_t == math.inf:
        return float(np.nextafter(max(scores), math.inf)), best_correct
    rejected = [s for s in scores if s < best_t]
    if not rejected:
        return float(np.nextafter(best_t, -math.inf)), best_correct
    return (max(rejected) + best_t) / 2.0, best_correct


def ref_protocol(scores, labels, n_folds=10):
    scores = [float(s) for s in scores]
    labels = [bool(y) for y in labels]
    n = len(scores)
    base, extra = divmod(n, n_folds)
    accs, thrs, start = [], [], 0
    for k in range(n_folds):
        size = base + (1 if k < extra else 0)
        test = list(range(start, start + size))
        start += size
        train = [i for i in range(n) if i not in test]
        thr, _ = ref_best_threshold([scores[i] for i in train], [labels[i] for i in train])
        right = sum(1 for i in test if (scores[i] >= thr) == labels[i])
        accs.append(right / len(test))
        thrs.append(thr)
    return {
        "accuracy": statistics.fmean(accs),
        "accuracy_std": statistics.pstdev(accs),
        "threshold": statistics.fmean(thrs),
        "pairs": n,
        "tar_at_far": ref_tar(scores, labels),
    }


def ref_tar(scores, labels, fars=DEFAULT_FAR_TARGETS):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    # (false accepts, true accepts) of every threshold
    points = [(sum(1 for s in neg if s >= t), sum(1 for s in pos if s >= t))
              for t in sorted(set(scores)) + [math.inf]]
    out = {}
    for f in fars:
        allowed = math.floor(f * len(neg) + 1e-9)
        if not pos or not neg or allowed < 1:
            out[far_key(f)] = None
        else:
            out[far_key(f)] = max(ta for fa, ta in points if fa <= allowed) / len(pos)
    return out


def assert_same(got, want):
    assert set(got) == KEYS
    assert got["pairs"] == want["pairs"]
    for k in ("accuracy", "accuracy_std", "threshold"):
        assert got[k] == pytest.approx(want[k], abs=1e-12), k
    assert list(got["tar_at_far"]) == FAR_KEYS
    for k, v in want["tar_at_far"].items():
        if v is None:
            assert got["tar_at_far"][k] is None, k
        else:
            assert got["tar_at_far"][k] == pytest.approx(v, abs=1e-12), k


# --------------------------------------------------------------------------- protocol
def test_continuous_scores_match_reference(rng):
    labels = rng.random(300) < 0.5
    scores = np.where(labels, rng.normal(0.5, 0.2, 300), rng.normal(0.1, 0.2, 300))
    assert_same(verify_scores(scores, labels), ref_protocol(scores, labels))


def test_heavily_tied_scores_match_reference(rng):
    labels = rng.random(200) < 0.5
    scores = np.round(np.where(labels, rng.normal(0.4, 0.3, 200), rng.normal(0.1, 0.3, 200)), 1)
    assert len(np.unique(scores)) < 20  # many ties
    got = verify_scores(scores, labels)
    assert_same(got, ref_protocol(scores, labels))


def test_uneven_fold_sizes_match_reference(rng):
    labels = rng.random(97) < 0.4
    scores = np.where(labels, rng.normal(0.6, 0.3, 97), rng.normal(0.2, 0.3, 97))
    for folds in (2, 3, 10):
        got = verify_scores(scores, labels, n_folds=folds)
        assert_same(got, ref_protocol(scores, labels, folds))


def test_single_class_folds_match_reference(rng):
    # Each contiguous fold holds only positives or only negatives (file sorted by label).
    labels = np.array([True] * 50 + [False] * 50)
    scores = np.concatenate([rng.normal(0.5, 0.25, 50), rng.normal(0.1, 0.25, 50)])
    assert_same(verify_scores(scores, labels), ref_protocol(scores, labels))


def test_all_positive_pairs_accept_everything():
    scores = np.linspace(-0.5, 0.9, 40)
    labels = np.ones(40, dtype=bool)
    got = verify_scores(scores, labels)
    assert_same(got, ref_protocol(scores, labels))
    # trained on positives only, every fold accepts from just below its training minimum: the
    # first fold holds the 4 lowest scores and rejects them all, the other 9 folds are perfect
    assert got["accuracy"] == pytest.approx(0.9) and got["accuracy_std"] == pytest.approx(0.3)
    assert all(v is None for v in got["tar_at_far"].values())  # no impostors: FAR undefined


def test_all_scores_tied_prefers_the_higher_threshold():
    # Only "accept all" or "accept none" exist; with equally many of each label both score 50 %
    # on every training split of equal balance, and the tie goes to "accept none".
    scores = np.full(20, 0.3)
    labels = np.array([True, False] * 10)
    thr, correct = best_threshold(scores, labels)
    assert correct == 10 and thr > 0.3 and thr == np.nextafter(0.3, 1)
    got = verify_scores(scores, labels)
    assert_same(got, ref_protocol(scores, labels))
    assert got["accuracy"] == 0.5


def test_hand_computed_two_fold_example():
    scores = [0.9, 0.8, 0.3, 0.1, 0.7, 0.6, 0.5, 0.2]
    labels = [True, True, False, False, True, False, True, False]
    # fold 1 = pairs 0-3 (trained on 4-7: best is t in (0.2, 0.5] -> 3/4, or t in (0.6, 0.7] -> 3/4;
    # the higher wins, midpoint 0.65) -> fold 1 all correct; fold 2 trained on 0-3: t in (0.3, 0.8]
    # -> midpoint 0.55 -> pairs 4,5,6,7 -> right, wrong, wrong, right.
    got = verify_scores(scores, labels, n_folds=2, far_targets=(0.25, 0.5))
    assert got["accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    assert got["accuracy_std"] == pytest.approx(0.25)
    assert got["threshold"] == pytest.approx((0.65 + 0.55) / 2)
    # 4 negatives (0.3, 0.1, 0.6, 0.2): FAR 0.25 allows 1 false accept (0.6), so threshold 0.5 keeps
    # all 4 positives; FAR 0.24 allows none -> not measurable.
    assert got["tar_at_far"] == {"0.25": 1.0, "5e-1": 1.0}
    assert tar_at_far(scores, labels, (0.24,)) == {"0.24": None}
    # negatives 0.75 and 0.6: one false accept (0.75) keeps positives 0.9, 0.8, 0.7 but not 0.5
    scores[2] = 0.75
    assert tar_at_far(scores, labels, (0.25, 0.5)) == {"0.25": 0.75, "5e-1": 1.0}


def test_tar_at_far_matches_reference_and_nulls_unmeasurable_targets(rng):
    labels = rng.random(2000) < 0.5
    scores = np.round(np.where(labels, rng.normal(0.5, 0.2, 2000), rng.normal(0.0, 0.2, 2000)), 2)
    got = tar_at_far(scores, labels)
    want = ref_tar(list(scores), list(labels))
    assert got == pytest.approx(want)
    n_neg = int((~labels).sum())
    assert 1e-3 * n_neg >= 1 > 1e-4 * n_neg
    assert got["1e-4"] is None and got["1e-3"] is not None


# --------------------------------------------------------------------------- embeddings
def test_verify_pairs_uses_cosine_of_normalised_embeddings(rng):
    p, d = 120, 8
    emb1 = rng.normal(size=(p, d))
    issame = rng.random(p) < 0.5
    noise = rng.normal(size=(p, d))
    emb2 = np.where(issame[:, None], emb1 + 0.8 * noise, noise)
    scaled = emb2 * rng.uniform(0.1, 10, size=(p, 1))  # scale must not matter
    cos = [float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(emb1, emb2)]
    got = verify_pairs(emb1.astype(np.float32), scaled.astype(np.float32), issame)
    want = ref_protocol(cos, issame)
    assert set(got) == KEYS and got["pairs"] == p
    assert got["accuracy"] == pytest.approx(want["accuracy"])
    assert got["threshold"] == pytest.approx(want["threshold"], abs=1e-6)


def test_torch_inputs_accepted(rng):
    import torch

    e = rng.normal(size=(20, 4)).astype(np.float32)
    flags = np.arange(20) % 2 == 0
    a = verify_pairs(torch.from_numpy(e), torch.from_numpy(e[::-1].copy()), torch.from_numpy(flags))
    b = verify_pairs(e, e[::-1].copy(), flags)
    assert a == b


def test_errors_are_dcq_errors(rng):
    with pytest.raises(DcqError, match="folds"):
        verify_scores([0.1, 0.2, 0.3], [True, False, True])
    with pytest.raises(DcqError, match="NaN"):
        verify_scores([0.1, np.nan] * 10, [True, False] * 10)
    with pytest.raises(DcqError, match="issame"):
        verify_scores([0.1] * 10, [True] * 9)
    with pytest.raises(DcqError, match="shape"):
        verify_pairs(np.zeros((10, 3)), np.zeros((10, 4)), [True] * 10)


def test_roc_curve_points_and_far_keys(rng):
    labels = rng.random(100) < 0.5
    scores = rng.normal(size=100) + labels
    fpr, tpr, thr = roc_curve_points(scores, labels)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert len(thr) == len(np.unique(scores)) + 1  # no point dropped
    assert [far_key(f) for f in DEFAULT_FAR_TARGETS] == FAR_KEYS
    assert far_key(5e-3) == "5e-3" and far_key(0.25) == "0.25"
    with pytest.raises(DcqError):
        roc_curve_points([0.1, 0.2], [True, True])
