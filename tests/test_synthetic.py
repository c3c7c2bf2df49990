"""Synthetic dataset: long-tail profiles, determinism, formats, and the raw-pixel baseline staying weak."""

import json
import os

import numpy as np
import pytest

from dcq.data import (
    FaceRecordIO,
    ImageFolderDataset,
    decode_image,
    read_bin,
    read_probe_set,
    synthesize,
)
from dcq.data import synth as synthetic
from dcq.data.synth.dataset import _val_pairs, count_histogram, images_per_identity
from dcq.errors import DcqError


def test_mf2_profile_is_long_tailed():
    c = images_per_identity("mf2", 3000, seed=0)
    assert np.mean(c < 10) >= 0.85
    assert np.mean(c <= 3) >= 0.5  # many identities with 1-3 images
    assert c.min() == 1 and c.max() >= 100 and np.sum(c >= 50) >= 10  # a few heavy ones
    small = images_per_identity("mf2", 40, seed=3)
    assert np.mean(small < 10) >= 0.85  # stratified: the shape holds for tiny sets too


def test_ms1m_profile_is_head_heavy():
    c = images_per_identity("ms1m", 3000, seed=0)
    assert np.median(c) >= 30
    assert 30 <= np.mean(c) <= 80 and c.max() >= 200 and c.min() >= 2
    assert np.median(images_per_identity("ms1m", 15, seed=9)) >= 30
    assert not np.array_equal(c, images_per_identity("ms1m", 3000, seed=1))
    with pytest.raises(DcqError, match="profile"):
        images_per_identity("lfw", 10)


def test_histogram_buckets():
    h = count_histogram(np.array([1, 1, 2, 3, 4, 9, 10, 250]))
    assert h["1"] == 2 and h["2"] == 1 and h["3-4"] == 2 and h["5-9"] == 1 and h["10-19"] == 1
    assert h["200+"] == 1 and sum(h.values()) == 8


def test_val_pairs_layout():
    pairs = _val_pairs(0, first_identity=100, val_identities=7, pairs=40)
    same = [p[4] for p in pairs]
    assert same == [True, False] * 20  # every fold of 4 pairs is half positive, interleaved
    for ia, ka, ib, kb, s in pairs:
        assert 100 <= ia < 107 and 100 <= ib < 107
        assert (ia == ib) == s
    inst = [(ia, ka) for ia, ka, *_ in pairs] + [(ib, kb) for _, _, ib, kb, _ in pairs]
    assert len(set(inst)) == len(inst)  # every image is a fresh instance


def _files(d):
    out = {}
    for root, _, names in os.walk(d):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, d)] = f.read()
    return out


def test_rec_dataset_contents_and_determinism(tmp_path):
    kw = {"profile": "mf2", "identities": 12, "image_size": 24, "seed": 4, "val_identities": 6, "val_pairs": 40,
          "progress": False}
    st = synthesize(tmp_path / "a", **kw)
    a = tmp_path / "a"
    assert sorted(os.listdir(a)) == ["probe.idx", "probe.rec", "stats.json", "train.idx", "train.rec", "val.bin"]
    stats = json.loads((a / "stats.json").read_text())
    for key in ("profile", "seed", "image_size", "identities", "images", "train_images_per_identity", "histogram",
                "fraction_under_10", "median_images_per_identity", "val_pairs", "val_identities", "probes"):
        assert key in stats
    counts = np.array(stats["train_images_per_identity"])
    assert stats["images"] == counts.sum() == st["images"] and stats["identities"] == 12
    assert stats["fraction_under_10"] == pytest.approx(np.mean(counts < 10))
    ds = FaceRecordIO(a / "train.rec")
    assert ds.header0 is not None and len(ds) == counts.sum() and ds.num_identities == 12
    assert np.array_equal(np.bincount(ds.labels, minlength=12), counts)
    assert decode_image(ds.image_bytes(0)).shape == (24, 24, 3)
    images, issame = read_bin(a / "val.bin")
    assert len(issame) == 40 and issame.sum() == 20 and len(images) == 80
    probes = read_probe_set(a)
    assert len(probes) == 12 and probes.labels.tolist() == list(range(12))
    assert np.array_equal(probes.train_counts, counts)
    train_bytes = {ds.image_bytes(i) for i in range(len(ds))}
    assert not any(b in train_bytes for b in probes.images)  # held out, not copies
    # same seed -> same bytes, also with worker processes; another seed -> different images
    synthesize(tmp_path / "b", workers=2, **kw)
    assert _files(a) == _files(tmp_path / "b")
    synthesize(tmp_path / "c", **{**kw, "seed": 5})
    assert _files(a)["train.rec"] != _files(tmp_path / "c")["train.rec"]


def test_folder_format_holds_the_same_images(tmp_path):
    kw = {"identities": 3, "image_size": 20, "seed": 1, "val_identities": 4, "val_pairs": 20, "progress": False}
    synthesize(tmp_path / "rec", **kw)
    synthesize(tmp_path / "folder", fmt="folder", **kw)
    rec = FaceRecordIO(tmp_path / "rec" / "train.rec")
    fol = ImageFolderDataset(tmp_path / "folder" / "train")
    assert fol.labels.tolist() == rec.labels.tolist()
    assert fol.identity_names == ["id_000000", "id_000001", "id_000002"]
    assert all(fol.image_bytes(i) == rec.image_bytes(i) for i in range(0, len(rec), 7))
    # re-running in another format replaces the old training files
    synthesize(tmp_path / "rec", fmt="folder", **kw)
    assert not (tmp_path / "rec" / "train.rec").exists() and (tmp_path / "rec" / "train").is_dir()


def test_interrupted_run_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    import dcq.data.verification_bin as vb

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(vb, "write_bin", boom)
    with pytest.raises(KeyboardInterrupt):
        synthesize(tmp_path, identities=2, image_size=20, val_identities=3, val_pairs=20, progress=False)
    assert os.listdir(tmp_path) == []


def test_refuses_to_overwrite_foreign_files(tmp_path):
    (tmp_path / "train.rec").write_bytes(b"precious")
    with pytest.raises(DcqError, match="did not write"):
        synthesize(tmp_path, identities=2, image_size=20, val_pairs=20, progress=False)
    assert (tmp_path / "train.rec").read_bytes() == b"precious"


def _ten_fold_accuracy(sims, issame):
    """LFW protocol: contiguous folds; threshold picked on 9 folds by a full sweep, scored on the 10th."""
    n = len(sims)
    fold = np.arange(n) * 10 // n
    accs = []
    for f in range(10):
        tr, te = fold != f, fold == f
        s = np.sort(sims[tr])
        cand = np.concatenate([[s[0] - 1e-6], (s[1:] + s[:-1]) / 2, [s[-1] + 1e-6]])
        acc = ((sims[tr][None, :] > cand[:, None]) == issame[tr][None, :]).mean(axis=1)
        t = cand[int(np.argmax(acc))]
        accs.append(np.mean((sims[te] > t) == issame[te]))
    return float(np.mean(accs))


def test_raw_pixels_verify_poorly(tmp_path):
    synthesize(tmp_path, identities=2, image_size=32, seed=0, val_identities=80, val_pairs=400, progress=False)
    images, issame = read_bin(tmp_path / "val.bin")
    x = np.stack([decode_image(b) for b in images]).astype(np.float32)
    x = ((x - 127.5) / 127.5).reshape(len(x), -1)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = np.sum(x[0::2] * x[1::2], axis=1)
    acc = _ten_fold_accuracy(sims, issame)
    assert acc < 0.80, acc
    # ...yet the pairs carry signal: positives are more similar on average
    assert sims[issame].mean() > sims[~issame].mean()


def test_renderer_sizes_and_errors():
    for size in (16, 40, 112):
        img = synthetic.FaceRenderer(size).render(synthetic.identity_params(0, 1), np.random.default_rng(0))
        assert img.size == (size, size) and img.mode == "RGB"
    with pytest.raises(DcqError, match="too small"):
        synthetic.FaceRenderer(8)
    with pytest.raises(DcqError, match="format"):
        synthesize("/nonexistent-never-created", fmt="zip")


def test_cli_synth(tmp_path, capsys):
    from dcq.cli import main

    rc = main(["synth", str(tmp_path / "o"), "--identities", "3", "--image-size", "20", "--val-pairs", "20",
               "--val-identities", "4", "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "3 identities" in out and "images/s" in out and "under 10" in out
    assert main(["synth", str(tmp_path / "p"), "--identities", "0", "--quiet"]) == 2
