import numpy as np
import pytest
import torch

from dcq import ClassQueue


class RingReference:
    """Independent ring buffer: explicit slot-by-slot writes."""

    def __init__(self, size, dim):
        self.w = np.zeros((size, dim), np.float32)
        self.l = np.full(size, -1, np.int64)
        self.ptr = 0

    def push(self, w, l):
        for row, lab in zip(w, l):
            self.w[self.ptr] = row
            self.l[self.ptr] = lab
            self.ptr = (self.ptr + 1) % len(self.l)


def test_starts_empty():
    q = ClassQueue(5, 3)
    assert q.weights.shape == (5, 3) and q.labels.dtype == torch.int64
    assert (q.labels == -1).all() and q.filled == 0


@pytest.mark.parametrize("size,batches", [(7, [3, 3, 3, 3]), (8, [3, 5, 2, 7]), (4, [6]), (5, [5, 1, 5])])
def test_enqueue_wraps_like_reference(size, batches):
    rng = np.random.default_rng(0)
    q, ref = ClassQueue(size, 2), RingReference(size, 2)
    total = 0
    for n in batches:
        w = rng.normal(size=(n, 2)).astype(np.float32)
        lab = rng.integers(0, 4, n)
        q.enqueue(torch.from_numpy(w), torch.from_numpy(lab))
        ref.push(w, lab)
        total += n
        np.testing.assert_array_equal(q.labels.numpy(), ref.l)
        np.testing.assert_allclose(q.weights.numpy(), ref.w)
        assert int(q.ptr) == ref.ptr
        assert q.filled == min(size, total)


def test_state_dict_round_trip():
    q = ClassQueue(6, 4)
    q.enqueue(torch.randn(4, 4), torch.tensor([1, 2, 3, 4]))
    q2 = ClassQueue(6, 4)
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2.weights, q.weights) and torch.equal(q2.labels, q.labels)
    assert int(q2.ptr) == 4 and q2.filled == 4
    assert set(q.state_dict()) == {"weights", "labels", "ptr", "count"}


def test_bad_shapes_rejected():
    q = ClassQueue(4, 3)
    with pytest.raises(ValueError):
        q.enqueue(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        q.enqueue(torch.randn(2, 3), torch.tensor([0]))
    with pytest.raises(ValueError):
        ClassQueue(0, 3)
