"""benchmarks/score_tail.py: the all-pairs statistics from the Gram matrix equal a brute-force
computation over every pair."""

import importlib
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_score_tail_matches_brute_force(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    score_tail = importlib.import_module("score_tail").score_tail
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(40), 5)
    x = rng.normal(size=(200, 16)) + 0.3 + np.repeat(rng.normal(size=(40, 16)), 5, axis=0)
    got = score_tail(x, labels)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    i, j = np.triu_indices(200, 1)
    s = np.sum(u[i] * u[j], axis=1)
    same = labels[i] == labels[j]
    assert got["genuine_pairs"] == same.sum() == 400 and got["impostor_pairs"] == (~same).sum()
    assert got["genuine_mean"] == pytest.approx(s[same].mean(), abs=1e-9)
    assert got["genuine_std"] == pytest.approx(s[same].std(), abs=1e-9)
    assert got["impostor_mean"] == pytest.approx(s[~same].mean(), abs=1e-9)
    assert got["impostor_std"] == pytest.approx(s[~same].std(), abs=1e-9)
    cov = np.cov(u, rowvar=False, bias=True)
    assert got["participation_ratio"] == pytest.approx(np.trace(cov) ** 2 / np.trace(cov @ cov), rel=1e-9)
    assert got["mean_norm"] == pytest.approx(np.linalg.norm(u.mean(axis=0)))
    assert 1 <= got["participation_ratio"] <= 16
    # an isotropic embedding uses every dimension; one squeezed onto 2 of its 16 uses about 2
    iso = score_tail(rng.normal(size=(4000, 16)), np.arange(4000) // 2)["participation_ratio"]
    flat = rng.normal(size=(4000, 16)) * np.r_[np.ones(2), np.full(14, 1e-3)]
    assert iso > 15 and score_tail(flat, np.arange(4000) // 2)["participation_ratio"] < 2.2


def test_markdown_table(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module("score_tail")
    labels = np.repeat(np.arange(50), 4)
    row = {"label": "m", **module.score_tail(np.random.default_rng(1).normal(size=(200, 8)), labels)}
    text = module.markdown([row])
    assert text.count("\n") == 3 and f"| m | {row['genuine_mean']:.3f} |" in text
    assert f"{row['participation_ratio']:.1f} / 8" in text
    assert row["tar_at_far"]["1e-6"] is None and "/ n/a |" in text  # 19,500 impostor pairs: no 1e-6
