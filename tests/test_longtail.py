"""Long-tail buckets pinned against an explicit per-probe loop; TAR helper against sklearn; plots."""

import math
import os

import numpy as np
import pytest

from dcq.errors import DcqError
from dcq.eval.longtail import (
    DEFAULT_BUCKETS,
    longtail_from_embeddings,
    longtail_metrics,
    rows_to_markdown,
    tar_at_far_from_scores,
)
from dcq.eval.verification import far_key, tar_at_far

FARS = (1e-3, 1e-2, 1e-1)


def unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def ref_rows(train_emb, train_lab, probe_emb, probe_lab, buckets, fars):
    """Explicit loops: centres, rank-1 (strictly above every other centre), TAR by threshold sweep."""
    ids = sorted({int(x) for x in train_lab})
    centre, count = {}, {}
    for i in ids:
        members = [unit(e) for e, lab in zip(train_emb, train_lab) if lab == i]
        centre[i] = unit(sum(members) / len(members))
        count[i] = len(members)
    rows = []
    for lo, hi in list(buckets) + [(1, None)]:
        top = math.inf if hi is None else hi
        sel = [j for j in range(len(probe_lab)) if lo <= count[int(probe_lab[j])] <= top]
        hits, gen, imp = 0, [], []
        for j in sel:
            p, lab = unit(probe_emb[j]), int(probe_lab[j])
            own = float(p @ centre[lab])
            others = [float(p @ centre[i]) for i in ids if i != lab]
            hits += all(own > o for o in others)
            gen.append(own)
            imp.extend(others)
        tar = {}
        for f in fars:
            allowed = math.floor(f * len(imp) + 1e-9)
            if not gen or allowed < 1:
                tar[far_key(f)] = None
                continue
            best = 0.0
            for t in sorted(set(gen + imp)) + [math.inf]:
                if sum(1 for s in imp if s >= t) <= allowed:
                    best = max(best, sum(1 for s in gen if s >= t) / len(gen))
            tar[far_key(f)] = best
        rows.append({"probes": len(sel), "rank1": hits / len(sel) if sel else None, "tar_at_far": tar,
                     "identities": sum(1 for i in ids if lo <= count[i] <= top), "impostor_pairs": len(imp)})
    return rows


def make_data(rng, d=16):
    counts = [1, 1, 1, 2, 2, 3, 4, 5, 7, 9, 10, 12, 20, 49, 50, 60] * 2
    mus = rng.normal(size=(len(counts), d))
    train_lab = np.repeat(np.arange(len(counts)), counts)
    train = mus[train_lab] + 0.9 * rng.normal(size=(len(train_lab), d))
    probe_lab = np.concatenate([np.arange(len(counts)), np.arange(0, len(counts), 2)])
    probes = mus[probe_lab] + 0.9 * rng.normal(size=(len(probe_lab), d))
    return train.astype(np.float32), train_lab, probes.astype(np.float32), probe_lab


def check_rows(got, want, names):
    assert [r["bucket"] for r in got] == names
    for g, w in zip(got, want):
        assert g["probes"] == w["probes"] and g["identities"] == w["identities"]
        assert g["impostor_pairs"] == w["impostor_pairs"] and g["impostors_sampled"] is False
        if w["rank1"] is None:
            assert g["rank1"] is None
        else:
            assert g["rank1"] == pytest.approx(w["rank1"])
        assert g["tar_at_far"].keys() == w["tar_at_far"].keys()
        for k, v in w["tar_at_far"].items():
            assert g["tar_at_far"][k] == (None if v is None else pytest.approx(v)), (g["bucket"], k)


def test_default_buckets_match_explicit_loop(rng):
    train, train_lab, probes, probe_lab = make_data(rng)
    got = longtail_from_embeddings(train, train_lab, probes, probe_lab, far_targets=FARS)
    want = ref_rows(train, train_lab, probes, probe_lab, DEFAULT_BUCKETS, FARS)
    check_rows(got, want, ["1-2", "3-9", "10-49", "50+", "all"])
    assert 0 < got[-1]["rank1"] < 1  # neither trivial nor hopeless
    assert any(v is not None for r in got for v in r["tar_at_far"].values())


def test_custom_buckets_and_empty_bucket(rng):
    train, train_lab, probes, probe_lab = make_data(rng)
    buckets = ((1, 1), (2, 4), (100, None))
    got = longtail_from_embeddings(train, train_lab, probes, probe_lab, buckets=buckets, far_targets=FARS)
    check_rows(got, ref_rows(train, train_lab, probes, probe_lab, buckets, FARS), ["1", "2-4", "100+", "all"])
    empty = got[2]
    assert empty["probes"] == 0 and empty["rank1"] is None and all(v is None for v in empty["tar_at_far"].values())


def test_tied_centres_are_rank1_misses():
    # identities 0 and 1 have identical training images -> identical centres: their probes tie
    a, b = np.array([0.5, 0.5, 0.5, 0.5, 0, 0], np.float32), np.array([0, 0, 0.5, 0.5, 0.5, 0.5], np.float32)
    train = np.stack([a, a, a, a, b])
    train_lab = np.array([0, 0, 1, 1, 2])
    rows = longtail_from_embeddings(train, train_lab, np.stack([a, b]), np.array([0, 2]), far_targets=(0.5,))
    assert rows[0]["bucket"] == "1-2" and rows[0]["probes"] == 2
    assert rows[0]["rank1"] == 0.5  # probe of 0 ties with centre 1 (a miss); probe of 2 is a hit


def test_tar_helper_matches_sklearn_roc(rng):
    from sklearn.metrics import roc_curve

    for rounding in (None, 1):
        gen = rng.normal(0.5, 0.2, 300)
        imp = rng.normal(0.0, 0.2, 4000)
        if rounding is not None:
            gen, imp = np.round(gen, rounding), np.round(imp, rounding)
        scores = np.concatenate([gen, imp])
        labels = np.concatenate([np.ones(300, bool), np.zeros(4000, bool)])
        fars = (1e-4, 3e-4, 1e-3, 1e-2, 1e-1, 0.5)
        fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)  # exact ROC, every threshold
        want = [max(t for fa, t in zip(np.rint(fpr * 4000), tpr) if fa <= np.floor(f * 4000 + 1e-9))
                if np.floor(f * 4000 + 1e-9) >= 1 else None for f in fars]
        assert list(tar_at_far_from_scores(gen, imp, fars).values()) == pytest.approx(want)
        assert tar_at_far(scores, labels, fars) == tar_at_far_from_scores(gen, imp, fars)
    assert tar_at_far_from_scores([0.5], [0.1, 0.2], (0.4, 1.0)) == {"4e-1": None, "1e0": 1.0}


def test_impostor_sampling_above_the_cap(rng):
    train, train_lab, probes, probe_lab = make_data(rng)
    rows = longtail_from_embeddings(train, train_lab, probes, probe_lab, far_targets=FARS, max_impostor_pairs=200)
    full = longtail_from_embeddings(train, train_lab, probes, probe_lab, far_targets=FARS)
    for r, f in zip(rows, full):
        assert r["rank1"] == f["rank1"]  # rank-1 always uses the whole gallery
        if f["impostor_pairs"] > 200:
            assert r["impostors_sampled"] and 0 < r["impostor_pairs"] <= 200
        else:
            assert not r["impostors_sampled"] and r["impostor_pairs"] == f["impostor_pairs"]


def test_errors_and_markdown(rng):
    train, train_lab, probes, probe_lab = make_data(rng)
    with pytest.raises(DcqError, match="no training image"):
        longtail_from_embeddings(train, train_lab, probes[:1], [999])
    with pytest.raises(DcqError, match="bucket"):
        longtail_from_embeddings(train, train_lab, probes, probe_lab, buckets=((5, 2),))
    with pytest.raises(DcqError, match="empty"):
        longtail_metrics(train[:2], [0, 1], np.zeros((0, 16)), [], [])
    rows = longtail_from_embeddings(train, train_lab, probes, probe_lab, far_targets=FARS)
    md = rows_to_markdown(rows).splitlines()
    assert md[0].startswith("| training images / identity |") and "TAR@FAR=1e-2" in md[0]
    assert len(md) == 2 + len(rows) and md[2].startswith("| 1-2 |")
    assert "n/a" in rows_to_markdown(rows)  # 1e-3 is not measurable in the small buckets


def test_plots_write_pngs_atomically(tmp_path, rng):
    from dcq.eval.plots import plot_longtail, plot_roc
    from dcq.eval.verification import roc_curve_points

    labels = rng.random(200) < 0.5
    fpr, tpr, _ = roc_curve_points(rng.normal(size=200) + labels, labels)
    out = plot_roc({"model": (fpr, tpr), "chance": ([0, 0.01, 1], [0, 0.01, 1])}, tmp_path / "figs" / "roc.png")
    train, train_lab, probes, probe_lab = make_data(rng)
    rows = longtail_from_embeddings(train, train_lab, probes, probe_lab, far_targets=FARS)
    out2 = plot_longtail({"dcq": rows, "fc": rows[:2]}, tmp_path / "figs" / "longtail.png")
    for p in (out, out2):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path / "figs")) == ["longtail.png", "roc.png"]


def test_longtail_report_on_a_synthetic_dataset(tmp_path):
    import json

    import torch

    from dcq.data import open_dataset, read_probe_set
    from dcq.data.synth.dataset import synthesize
    from dcq.eval import embed_images, longtail_report
    from dcq.models import get_backbone

    ds_dir = tmp_path / "ds"
    synthesize(ds_dir, profile="mf2", identities=20, image_size=16, val_pairs=20, val_identities=10, progress=False)
    torch.manual_seed(0)
    encoder = get_backbone("cpunet", embedding_size=8, image_size=16)
    report = longtail_report(encoder, ds_dir, 16, batch_size=7, far_targets=FARS)
    # the same rows from embeddings computed here, all at once
    ds, probe = open_dataset(ds_dir), read_probe_set(ds_dir)
    train = embed_images(encoder, [ds.image_bytes(i) for i in range(len(ds))])
    probes = embed_images(encoder, probe.images)
    want = longtail_from_embeddings(train, ds.labels, probes, probe.labels, far_targets=FARS)
    assert report["identities"] == 20 and report["probes"] == 20 and report["train_images"] == len(ds)
    for g, w in zip(report["rows"], want):
        assert g["bucket"] == w["bucket"] and g["probes"] == w["probes"] and g["rank1"] == w["rank1"]
        assert g["tar_at_far"] == pytest.approx(w["tar_at_far"])
    # probe set and training set from different runs are refused before anything is embedded
    stats = json.loads((ds_dir / "stats.json").read_text())
    stats["train_images_per_identity"][0] += 1
    (ds_dir / "stats.json").write_text(json.dumps(stats))
    with pytest.raises(DcqError, match="disagree"):
        longtail_report(encoder, ds_dir, 16)
