"""dcq.eval.lowfar: the streamed all-against-all TAR@FAR against a brute-force computation."""

import itertools
import math

import numpy as np
import pytest

from dcq.errors import DcqError
from dcq.eval import pair_counts, streamed_tar_at_far


def brute_force(x, labels, fars):
    """Every pair i < j, then the best TAR over every threshold t ("same" iff score >= t) whose
    false accepts are at most floor(FAR x impostors): no partial sort, no blocks."""
    genuine, impostor = [], []
    for i, j in itertools.combinations(range(len(labels)), 2):
        s = float(np.dot(x[i].astype(np.float64), x[j].astype(np.float64)))
        (genuine if labels[i] == labels[j] else impostor).append(s)
    genuine, impostor = np.array(genuine), np.array(impostor)
    candidates = np.append(np.unique(np.concatenate([genuine, impostor])), np.inf)
    out = {}
    for key, far in fars.items():
        allowed = math.floor(far * impostor.size + 1e-9)
        if allowed < 1:
            out[key] = None
            continue
        best = 0.0
        for t in candidates:
            if np.sum(impostor >= t) <= allowed:
                best = max(best, float(np.mean(genuine >= t)))
        out[key] = best
    return out, genuine.size, impostor.size


def tied_embeddings(n, identities, seed):
    """Unit vectors whose cosines are exact multiples of 1/4 (four entries of +-1/2 in 8 dims),
    drawn from few patterns: many pairs score exactly the same, so ties at the threshold are common;
    an identity's images share most of their pattern, so genuine scores are higher."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, identities, n)
    base = {}
    x = np.zeros((n, 8), dtype=np.float32)
    for row, lab in enumerate(labels):
        if lab not in base:
            base[lab] = rng.choice(8, 4, replace=False), rng.choice([-0.5, 0.5], 4)
        dims, signs = base[lab]
        dims, signs = dims.copy(), signs.copy()
        if rng.random() < 0.5:  # an image of the identity differs in one entry
            k = rng.integers(4)
            signs[k] = -signs[k]
        x[row, dims] = signs
    return x, labels


@pytest.mark.parametrize("block", [1, 7, 64, 1000])
def test_streamed_equals_brute_force_with_ties(block):
    x, labels = tied_embeddings(150, 20, seed=3)
    fars = {"1e-1": 0.1, "1e-2": 0.01, "1e-3": 0.001, "1e-4": 1e-4, "1e-5": 1e-5}
    expected, n_gen, n_imp = brute_force(x, labels, fars)
    got = streamed_tar_at_far(x, labels, far_targets=list(fars.values()), block=block)
    assert got["genuine_pairs"] == n_gen and got["impostor_pairs"] == n_imp
    assert n_imp == 150 * 149 // 2 - n_gen
    assert got["tar_at_far"] == pytest.approx(expected)
    # ties really occur at the thresholds this test checks, so the rule is exercised
    scores = np.concatenate([np.asarray(x[i] @ x[i + 1:].T) for i in range(len(x) - 1)])
    assert any(np.sum(scores == t) > 1 for t in got["thresholds"].values() if t is not None)
    # 1e-5 of ~10K impostor pairs is below one false accept: not measurable, and said so
    assert got["tar_at_far"]["1e-5"] is None and got["impostors_above"]["1e-5"] == 0
    assert got["impostors_above"]["1e-2"] == math.floor(0.01 * n_imp)


def test_continuous_scores_and_normalisation():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(30, 16))
    labels = np.repeat(np.arange(30), 6)
    x = (centres[labels] + 0.8 * rng.normal(size=(180, 16))).astype(np.float32) * 3.0  # not unit length
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    fars = {"1e-2": 0.01, "1e-3": 0.001, "1e-4": 1e-4}
    expected, _, _ = brute_force(unit, labels, fars)
    got = streamed_tar_at_far(x, labels, far_targets=list(fars.values()), block=13)
    assert got["tar_at_far"] == pytest.approx(expected, abs=1e-6)
    assert 0 < got["tar_at_far"]["1e-3"] < got["tar_at_far"]["1e-2"] <= 1


def test_pair_counts_and_bad_input():
    assert pair_counts([0, 0, 0, 1, 1, 2]) == (4, 11)
    with pytest.raises(DcqError, match="labels"):
        streamed_tar_at_far(np.ones((4, 3)), [0, 1, 2])
    with pytest.raises(DcqError, match="NaN"):
        streamed_tar_at_far(np.full((4, 3), np.nan), [0, 1, 2, 3])
    with pytest.raises(DcqError, match="all zeros"):
        streamed_tar_at_far(np.zeros((4, 3)), [0, 1, 2, 3])
    with pytest.raises(DcqError, match="FAR target"):
        streamed_tar_at_far(np.eye(4), [0, 1, 2, 3], far_targets=[1.5])
