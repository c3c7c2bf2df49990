"""The training feed's items: seeded per item on the CPU generator, the same in workers as in process."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dcq.data import FaceRecordIO, PairDataset, PairSampler, TrainTransform, normalize
from dcq.data.batching import collate_pairs, is_pixel_ordered
from dcq.data.recordio import write_face_recordio
from dcq.train.feed import PositionedSampler, SeededItems


def _images(n=4, h=5, w=7, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def _jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def rec(tmp_path):
    imgs = _images(24, 16, 16, seed=3)
    write_face_recordio(tmp_path, [(i // 6, _jpeg(img)) for i, img in enumerate(imgs)])
    return FaceRecordIO(tmp_path / "train.rec")


def _batches(rec, workers: int, normalize_in_worker: bool = False):
    """Batches as `dcq train` feeds them (uint8, collate_pairs), or float32 normalised in the worker."""
    pairs = PairSampler(rec.groups, mode="identity", num_references=2, seed=5)
    items = SeededItems(PairDataset(rec, TrainTransform(16, normalize=normalize_in_worker), num_references=2))
    loader = DataLoader(items, batch_size=8, sampler=PositionedSampler(pairs, 5), drop_last=True,
                        num_workers=workers, collate_fn=None if normalize_in_worker else collate_pairs)
    return list(loader)


def test_worker_batches_are_the_in_process_float_batches(rec):
    """Pixel-ordered uint8 batches from workers (shared memory) and from the main process, once
    normalised, are exactly the float32 batches of images normalised in the worker: the same items,
    flips and values."""
    reference = _batches(rec, 0, normalize_in_worker=True)
    for workers in (0, 2):
        got = _batches(rec, workers)
        assert len(got) == len(reference) == 3
        for (x, r, y), (fx, fr, fy) in zip(got, reference):
            assert x.dtype == torch.uint8 and x.shape == (8, 3, 16, 16) and r.shape == (8, 2, 3, 16, 16)
            assert is_pixel_ordered(x) and is_pixel_ordered(r)  # through shared memory, strides intact
            assert torch.equal(normalize(x), fx) and torch.equal(normalize(r), fr) and torch.equal(y, fy)


def test_item_seeding_touches_only_the_cpu_generator(rec, monkeypatch):
    """The per-item seed gives the stream torch.manual_seed gave, without its lazy accelerator seeding."""
    dataset = PairDataset(rec, TrainTransform(16, normalize=False), num_references=1)
    item = (3, (7,), 1234)
    torch.manual_seed(1234)
    expected = dataset[(3, (7,))]

    def refuse(*_):
        raise AssertionError("SeededItems must not seed accelerator generators")

    monkeypatch.setattr(torch, "manual_seed", refuse)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", refuse)
    before = torch.get_rng_state()
    got = SeededItems(dataset)[item]
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert torch.equal(torch.get_rng_state(), before)  # the caller's stream is left as it was
