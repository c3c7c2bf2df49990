"""PairSampler statistics, determinism, rank sharding and resume; PairDataset shapes and bad records."""

import io
import logging
import multiprocessing as mp

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dcq.data import EvalTransform, FaceRecordIO, PairDataset, PairSampler, TrainTransform
from dcq.data.recordio import write_face_recordio
from dcq.errors import DcqError


def _skewed_labels():
    # 30 identities with 1..30 images (one singleton), shuffled order; non-contiguous label values
    counts = np.arange(1, 31)
    labels = np.repeat(np.arange(30) * 3 + 5, counts)
    return np.random.default_rng(1).permutation(labels)


@pytest.mark.parametrize("mode", ["image", "identity"])
@pytest.mark.parametrize("k", [1, 3])
def test_references_share_the_label_and_differ_from_the_sample(mode, k):
    labels = _skewed_labels()
    sampler = PairSampler(labels, mode=mode, num_references=k, seed=3)
    counts = {lab: int(np.sum(labels == lab)) for lab in np.unique(labels)}
    items = list(sampler)
    assert len(items) == len(sampler) == labels.size
    for s, refs in items:
        assert len(refs) == k
        assert all(labels[r] == labels[s] for r in refs)
        n = counts[labels[s]]
        if n >= 2:
            assert s not in refs
            if n - 1 >= k:
                assert len(set(refs)) == k  # without replacement while possible
            else:
                assert set(refs) == set(np.flatnonzero(labels == labels[s])) - {s}
        else:
            assert refs == (s,) * k


def test_image_mode_is_a_permutation_and_references_uniform():
    labels = np.array([0] * 4 + [1] * 2)
    sampler = PairSampler(labels, mode="image", seed=0)
    hits = np.zeros((6, 6))
    for epoch in range(600):
        sampler.set_epoch(epoch)
        items = list(sampler)
        assert sorted(s for s, _ in items) == list(range(6))
        for s, (r,) in items:
            hits[s, r] += 1
    # image 0's references are uniform over images 1, 2, 3 (600 draws each row)
    row = hits[0, 1:4]
    assert np.all(np.abs(row - 200) < 5 * np.sqrt(600 * (1 / 3) * (2 / 3)))
    assert hits[4, 5] == 600 and hits[5, 4] == 600


def test_identity_mode_draws_identities_uniformly():
    labels = _skewed_labels()
    sampler = PairSampler(labels, mode="identity", seed=7)
    obs = np.zeros(30)
    for epoch in range(8):
        sampler.set_epoch(epoch)
        for s, _ in sampler:
            obs[(labels[s] - 5) // 3] += 1
    expected = obs.sum() / 30
    chi2 = float(np.sum((obs - expected) ** 2 / expected))
    # df = 29: mean 29, sd 7.6; 29 + 6 sd is far beyond chance but catches image-frequency sampling
    assert chi2 < 75, chi2
    # image mode would be proportional to identity size: check the test has power
    img_obs = 8 * np.bincount((labels - 5) // 3, minlength=30).astype(float)  # same 8 epochs
    assert float(np.sum((img_obs - img_obs.mean()) ** 2 / img_obs.mean())) > 200


def test_deterministic_for_seed_and_epoch():
    labels = _skewed_labels()
    a = PairSampler(labels, mode="identity", num_references=2, seed=11)
    b = PairSampler(labels, mode="identity", num_references=2, seed=11)
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(b)
    b.set_epoch(5)
    assert list(a) != list(b)
    c = PairSampler(labels, mode="identity", num_references=2, seed=12)
    c.set_epoch(4)
    assert list(a) != list(c)


@pytest.mark.parametrize("drop_last", [False, True])
def test_rank_shares_are_disjoint_and_cover_the_epoch(drop_last):
    labels = _skewed_labels()[:100]
    ws = 3
    full_s, full_r = PairSampler(labels, seed=2).epoch_items(6)
    shares = []
    for rank in range(ws):
        s = PairSampler(labels, seed=2, rank=rank, world_size=ws, drop_last=drop_last)
        s.set_epoch(6)
        shares.append(list(s))
        assert len(shares[-1]) == len(s) == (100 // ws if drop_last else -(-100 // ws))
    n = len(shares[0])
    assert all(len(x) == n for x in shares)
    # position i*ws + r of the (padded) epoch goes to rank r: disjoint, and together the whole epoch
    merged = [shares[r][i] for i in range(n) for r in range(ws)]
    full = [(int(a), tuple(int(x) for x in b)) for a, b in zip(full_s, full_r)]
    if drop_last:
        assert merged == full[: n * ws]
    else:
        assert merged == full + full[: n * ws - len(full)]  # padded with the start of the epoch
        assert sorted(s for s, _ in merged[:100]) == list(range(100))


def test_resume_mid_epoch_reproduces_the_rest():
    labels = _skewed_labels()
    s = PairSampler(labels, mode="identity", seed=5, rank=1, world_size=2)
    s.set_epoch(3)
    whole = list(s)
    s.set_epoch(3, start=17)
    assert len(s) == len(whole) - 17
    assert list(s) == whole[17:]
    s.set_epoch(4)
    assert len(s) == s.epoch_length
    with pytest.raises(DcqError):
        s.set_epoch(0, start=len(whole) + 1)


def test_sampler_argument_errors():
    with pytest.raises(DcqError, match="mode"):
        PairSampler([0, 1], mode="class")
    with pytest.raises(DcqError, match="rank"):
        PairSampler([0, 1], rank=2, world_size=2)
    with pytest.raises(DcqError, match="num_references"):
        PairSampler([0, 1], num_references=0)


# ----------------------------------------------------------------------------- PairDataset
def _png(v: int, size=8) -> bytes:
    buf = io.BytesIO()
    img = np.zeros((size, size, 3), np.uint8)
    img[:, : size // 2] = v  # asymmetric, so a flip is visible
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def small_rec(tmp_path):
    items = [(0, _png(10)), (0, _png(20)), (0, b"broken bytes"), (1, _png(40)), (2, _png(50)), (2, _png(60))]
    write_face_recordio(tmp_path, items)
    return FaceRecordIO(tmp_path / "train.rec")


def test_pair_dataset_shapes_and_collate(small_rec):
    ds = PairDataset(small_rec, EvalTransform(8), num_references=2, on_bad_record="skip")
    sampler = PairSampler(small_rec.labels, num_references=2, seed=0)
    loader = DataLoader(ds, batch_size=4, sampler=sampler)
    x, r, y = next(iter(loader))
    assert x.shape == (4, 3, 8, 8) and r.shape == (4, 2, 3, 8, 8) and y.shape == (4,)
    assert y.dtype == torch.int64 and x.dtype == torch.float32
    s, refs = next(iter(sampler))
    xs, _, ys = ds[(s, refs)]
    assert ys == small_rec.label(s)
    assert float(xs[0, 0, 0]) == pytest.approx((small_rec.image(s)[0, 0, 0] - 127.5) / 127.5)


def test_bad_record_fail_and_skip(small_rec, caplog):
    fail = PairDataset(small_rec, EvalTransform(8))
    with pytest.raises(DcqError, match=r"train.rec image 2 \(record key 3\) at byte offset \d+"):
        fail[(2, (0,))]
    skip = PairDataset(small_rec, EvalTransform(8), on_bad_record="skip")
    with caplog.at_level(logging.WARNING):
        x, _, y = skip[(2, (0,))]
    assert skip.bad_records == 1 and y == 0 and "skipping bad image" in caplog.text
    good = {float(v[0, 0, 0]) for v in (EvalTransform(8)(small_rec.image_bytes(i)) for i in (0, 1))}
    assert float(x[0, 0, 0]) in good  # replaced by another image of identity 0
    pre = PairDataset(small_rec, EvalTransform(8), preload=True, on_bad_record="skip", progress=False)
    pre[(2, (1,))]
    assert pre.bad_records == 1
    with pytest.raises(DcqError, match="image 2"):
        PairDataset(small_rec, EvalTransform(8), preload=True, progress=False)
    with pytest.raises(DcqError, match="reference"):
        skip[(0, (1, 1))]


def test_preload_matches_lazy_decoding(small_rec):
    lazy = PairDataset(small_rec, EvalTransform(8), on_bad_record="skip")
    pre = PairDataset(small_rec, EvalTransform(8), preload=True, on_bad_record="skip", progress=False)
    for item in [(0, (1,)), (3, (3,)), (4, (5,))]:
        a, b = lazy[item], pre[item]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    _, r, y = pre[4]  # a plain index draws its reference itself
    assert y == 2 and r.shape == (1, 3, 8, 8)


@pytest.mark.parametrize("ctx", ["fork", "spawn"])
def test_works_in_dataloader_workers(small_rec, ctx):
    if ctx not in mp.get_all_start_methods():
        pytest.skip(f"{ctx} not available")
    ds = PairDataset(small_rec, TrainTransform(8, seed=1), preload=(ctx == "spawn"),
                     on_bad_record="skip", progress=False)
    sampler = PairSampler(small_rec.labels, mode="identity", seed=0)
    loader = DataLoader(ds, batch_size=3, sampler=sampler, num_workers=1, multiprocessing_context=ctx)
    batches = list(loader)
    assert sum(b[0].shape[0] for b in batches) == len(small_rec)
    labels = torch.cat([b[2] for b in batches])
    expected = [small_rec.label(s) for s, _ in sampler]
    assert labels.tolist() == expected


@pytest.mark.parametrize("mode", ["image", "identity"])
@pytest.mark.parametrize("k", [1, 2])
def test_last_identity_with_a_single_image(mode, k):
    """Regression: a one-image identity sorted last used to index past the end of the dataset."""
    labels = np.array([0, 0, 0, 1, 1, 2])
    for epoch in range(5):
        sampler = PairSampler(labels, mode=mode, num_references=k, seed=epoch)
        for sample, refs in sampler:
            assert all(labels[r] == labels[sample] for r in refs)
            if labels[sample] == 2:
                assert tuple(refs) == (sample,) * k


# ----------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 100, 1023, 1024, 1025, 4099])
def test_keyed_permutation_is_a_bijection(n):
    from dcq.data.keyed import KeyedPermutation

    for key in (0, 1, 2**63 + 5):
        out = KeyedPermutation(n, key)(np.arange(n))
        assert sorted(out.tolist()) == list(range(n))
    if n >= 100:  # keys give different orders, and not the identity
        a, b = KeyedPermutation(n, 1)(np.arange(n)), KeyedPermutation(n, 2)(np.arange(n))
        assert not np.array_equal(a, b) and not np.array_equal(a, np.arange(n))


@pytest.mark.parametrize("mode", ["image", "identity"])
@pytest.mark.parametrize("ws", [1, 2, 3, 8])
def test_rank_shares_cover_the_image_epoch_exactly_once(mode, ws):
    labels = _skewed_labels()  # 465 images
    n = labels.size
    shares = []
    for rank in range(ws):
        s = PairSampler(labels, mode=mode, seed=4, rank=rank, world_size=ws, chunk_size=7)
        s.set_epoch(2)
        shares.append(list(s))
    full = PairSampler(labels, mode=mode, seed=4)
    full.set_epoch(2)
    whole = list(full)
    merged = [shares[r][i] for i in range(len(shares[0])) for r in range(ws)]
    assert merged[:n] == whole  # the ranks' items interleave back into the one-process epoch
    if mode == "image":
        assert sorted(s for s, _ in merged[:n]) == list(range(n))  # every image exactly once


@pytest.mark.parametrize("mode", ["image", "identity"])
def test_chunk_size_does_not_change_the_epoch(mode):
    labels = _skewed_labels()
    runs = []
    for chunk in (1, 7, 64, 1 << 16):
        s = PairSampler(labels, mode=mode, num_references=2, seed=9, rank=1, world_size=3, chunk_size=chunk)
        s.set_epoch(5)
        runs.append(list(s))
    assert all(r == runs[0] for r in runs)


@pytest.mark.parametrize("mode", ["image", "identity"])
def test_resume_costs_one_chunk_and_equals_the_tail(mode, monkeypatch):
    labels = _skewed_labels()
    s = PairSampler(labels, mode=mode, num_references=2, seed=1, rank=2, world_size=4, chunk_size=8)
    s.set_epoch(7)
    whole = list(s)
    computed = []
    real = PairSampler.at_positions

    def spy(self, positions, epoch, draws=None):
        computed.append(len(positions))
        return real(self, positions, epoch, draws)

    monkeypatch.setattr(PairSampler, "at_positions", spy)
    for start in (0, 1, 8, 9, 57, len(whole) - 1, len(whole)):
        s.set_epoch(7, start=start)
        computed.clear()
        it = iter(s)
        first = next(it, None)
        assert computed == ([] if start == len(whole) else [min(8, len(whole) - start)])  # O(chunk)
        assert ([first] + list(it) if first is not None else []) == whole[start:]


def test_identity_mode_is_balanced_on_a_long_tail():
    # one identity with 2,000 images and 1,000 singletons: image frequency would give it 2/3 of the
    # items, identity-balanced sampling 1/1001 of them
    labels = np.concatenate([np.zeros(2000, np.int64), np.arange(1, 1001)])
    s = PairSampler(labels, mode="identity", seed=3)
    samples, refs = s.epoch_items(0)
    big = int(np.sum(labels[samples] == 0))
    expected = samples.size / 1001  # 3 items; binomial sd ~1.7
    assert big <= expected + 15, big
    hits = np.bincount(labels[samples], minlength=1001)[1:]
    assert hits.max() <= 15  # 3 expected per singleton; a Poisson(3) exceeds 15 with p ~ 1e-7
    single = labels[samples] != 0
    assert np.all(refs[single, 0] == samples[single])


@pytest.mark.parametrize("mode", ["image", "identity"])
@pytest.mark.parametrize("labels", [
    [7],                                   # one image
    [4, 4],                                # one identity of two
    [3, 1, 2, 0],                          # all singletons, unsorted
    [2, 2, 0, 0, 1],                       # unsorted, singleton sorted last
    [0, 0, 5, 2**40, 2**40, 2**40],        # int64 label values, non-contiguous
])
def test_tiny_and_odd_label_sets(mode, labels):
    labels = np.array(labels, dtype=np.int64)
    for k in (1, 3):
        for seed in range(4):
            s = PairSampler(labels, mode=mode, num_references=k, seed=seed, world_size=2, rank=seed % 2)
            items = list(s)
            assert len(items) == len(s) == -(-labels.size // 2)
            for sample, refs in items:
                assert 0 <= sample < labels.size and len(refs) == k
                assert all(labels[r] == labels[sample] for r in refs)
                if np.sum(labels == labels[sample]) > 1:
                    assert sample not in refs
                else:
                    assert refs == (sample,) * k


def test_sorted_labels_need_no_per_image_copy():
    labels = np.repeat(np.arange(1000, dtype=np.int32), 3)
    s = PairSampler(labels, mode="image")
    assert s.groups.labels is labels and s.groups.order is None and s.groups.values is None
    assert s.groups.starts.dtype == np.int32 and s.groups.starts.size == 1001
    shuffled = PairSampler(np.random.default_rng(0).permutation(labels))
    assert shuffled.groups.order.dtype == np.int32
