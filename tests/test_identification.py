"""MegaFace-style identification: chunked ranks equal brute force (ties included), bounded memory."""

import tracemalloc

import numpy as np
import pytest

import dcq.eval.identification as ident
from dcq.errors import DcqError
from dcq.eval import identify
from dcq.eval.identification import match_ranks


def half_vectors(rng, n, d=8):
    """Unit vectors with four entries of +-0.5: dot products are exact multiples of 0.25 -> many exact ties."""
    out = np.zeros((n, d), dtype=np.float32)
    for i in range(n):
        cols = rng.choice(d, size=4, replace=False)
        out[i, cols] = rng.choice([-0.5, 0.5], size=4)
    return out


def brute_ranks(probes, p_lab, gallery, g_lab, distractors):
    """Full score matrix; rank = 1 + #(other-identity gallery items and distractors with score >= best own)."""
    items = np.concatenate([gallery, distractors]) if distractors is not None else gallery
    labels = list(g_lab) + [None] * (0 if distractors is None else len(distractors))
    ranks = []
    for p, lab in zip(probes.astype(np.float64), p_lab):
        scores = items.astype(np.float64) @ p
        true = max(s for s, l in zip(scores, labels) if l == lab)
        ranks.append(1 + sum(1 for s, l in zip(scores, labels) if l != lab and s >= true))
    return np.array(ranks)


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_matches_brute_force_with_ties(rng, chunk, monkeypatch):
    monkeypatch.setattr(ident, "_BLOCK_FLOATS", 20)  # several probe blocks even on this small case
    gallery = half_vectors(rng, 30)
    g_lab = rng.integers(0, 12, size=30)
    g_lab[:12] = np.arange(12)  # every identity present, some several times
    distractors = half_vectors(rng, 50)
    probes = half_vectors(rng, 25)
    p_lab = rng.integers(0, 12, size=25)
    want = brute_ranks(probes, p_lab, gallery, g_lab, distractors)
    got = match_ranks(probes, p_lab, gallery, g_lab, distractors, chunk_size=chunk)
    np.testing.assert_array_equal(got, want)
    assert len(set(want)) > 3  # the case is not trivial
    res = identify(probes, p_lab, gallery, g_lab, distractors, ranks=(1, 5, 10), chunk_size=chunk)
    assert res["rank"] == {k: float(np.mean(want <= int(k))) for k in ("1", "5", "10")}
    assert (res["probes"], res["gallery"], res["distractors"]) == (25, 30, 50)


def test_ties_count_against_the_probe():
    e = np.eye(4, dtype=np.float32)
    # the probe equals its own gallery item and a distractor: tie -> rank 2, not 1
    assert match_ranks(e[:1], [7], e[:2], [7, 8], e[:1]).tolist() == [2]
    assert match_ranks(e[:1], [7], e[:2], [7, 8]).tolist() == [1]
    # best own-identity item counts, other items of the own identity never rank above it
    assert match_ranks(e[:1], [7], np.stack([e[1], e[0], e[0]]), [7, 7, 8]).tolist() == [2]


def test_unnormalised_inputs_are_normalised(rng):
    g = rng.normal(size=(20, 6)).astype(np.float32)
    p = g[:5] + 0.01
    lab = np.arange(20)
    a = match_ranks(p * 7.0, lab[:5], g * rng.uniform(0.5, 3, size=(20, 1)).astype(np.float32), lab)
    b = brute_ranks(p / np.linalg.norm(p, axis=1, keepdims=True), lab[:5],
                    g / np.linalg.norm(g, axis=1, keepdims=True), lab, None)
    np.testing.assert_array_equal(a, b)


def test_errors(rng):
    g = half_vectors(rng, 4)
    with pytest.raises(DcqError, match="no gallery item"):
        match_ranks(g[:1], [9], g, [0, 1, 2, 3])
    with pytest.raises(DcqError, match="labels"):
        match_ranks(g[:2], [0], g, [0, 1, 2, 3])
    with pytest.raises(DcqError, match="sizes differ"):
        match_ranks(g[:1], [0], g, [0, 1, 2, 3], np.zeros((3, 5), np.float32))


def test_200k_distractors_in_bounded_memory():
    """200K x 512 float32 distractors (400 MB) with 128 probes: the full score matrix alone would be
    100 MB and a normalised copy of the distractors 400 MB; the chunked path stays well below both."""
    rng = np.random.default_rng(0)
    d, n_ids, n_probes, n_dis = 512, 64, 128, 200_000
    distractors = rng.standard_normal((n_dis, d), dtype=np.float32)
    gallery = rng.standard_normal((n_ids, d), dtype=np.float32)
    g_lab = np.arange(n_ids)
    p_lab = np.arange(n_probes) % n_ids
    probes = gallery[p_lab] + 0.3 * rng.standard_normal((n_probes, d), dtype=np.float32)
    # plant: probe 0's exact copy among the distractors (rank 2); probe 1 is pure noise (low rank)
    distractors[12345] = probes[0]
    probes[1] = rng.standard_normal(d, dtype=np.float32)
    tracemalloc.start()
    try:
        ranks = match_ranks(probes, p_lab, gallery, g_lab, distractors, chunk_size=8192)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 48 * 2**20, f"peak traced allocation {peak / 2**20:.1f} MiB"
    assert ranks[0] == 2
    assert ranks[1] > 1000  # random probe: about half of everything beats its true match
    assert np.all(ranks[2:] == 1)
