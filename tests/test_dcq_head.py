"""DCQ head against an independent numpy computation, step by step."""

import math

import numpy as np
import pytest
import torch

from dcq import DynamicClassQueue


def normalise(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class ReferenceDCQ:
    """The paper's head written out with explicit loops over rows and queue slots."""

    def __init__(self, size, dim, s, m, in_batch=False, dedup=False):
        self.w = np.zeros((size, dim))
        self.l = np.full(size, -1)
        self.ptr, self.size, self.s, self.m = 0, size, s, m
        self.in_batch, self.dedup = in_batch, dedup

    def newest(self):
        keep = np.zeros(self.size, bool)
        seen = set()
        for age in range(self.size):  # walk from the newest slot backwards
            slot = (self.ptr - 1 - age) % self.size
            if self.l[slot] >= 0 and self.l[slot] not in seen:
                seen.add(self.l[slot])
                keep[slot] = True
        return keep

    def step(self, query, key, labels):
        q = normalise(query.astype(np.float64))
        k = key.astype(np.float64)
        w = normalise(normalise(k).mean(axis=1)) if k.ndim == 3 else normalise(k)
        keep = self.newest() if self.dedup else np.ones(self.size, bool)
        rows, losses = [], []
        for i in range(len(q)):
            row = [self.s * (float(q[i] @ w[i]) - self.m)]
            for j in range(self.size):
                ok = self.l[j] >= 0 and self.l[j] != labels[i] and keep[j]
                row.append(self.s * float(q[i] @ self.w[j]) if ok else -math.inf)
            if self.in_batch:
                for j in range(len(q)):
                    row.append(self.s * float(q[i] @ w[j]) if labels[j] != labels[i] else -math.inf)
            row = np.array(row)
            finite = row[np.isfinite(row)]
            mx = finite.max()
            losses.append(-(row[0] - mx - math.log(np.exp(finite - mx).sum())))
            rows.append(row)
        for i in range(len(q)):
            self.w[self.ptr], self.l[self.ptr] = w[i], labels[i]
            self.ptr = (self.ptr + 1) % self.size
        return np.array(rows), float(np.mean(losses))


def run_steps(head, ref, batches, dtype=torch.float32, atol=1e-4):
    for query, key, labels in batches:
        tq = torch.tensor(query, dtype=dtype, requires_grad=True)
        out = head(tq, torch.tensor(labels), key=torch.tensor(key, dtype=dtype))
        as_input = (lambda a: a) if dtype == torch.float32 else (
            lambda a: torch.tensor(a, dtype=dtype).float().numpy())
        exp_logits, exp_loss = ref.step(as_input(query), as_input(key), labels)
        got = out.logits.detach().numpy()
        assert got.shape == exp_logits.shape
        np.testing.assert_array_equal(np.isinf(got), np.isinf(exp_logits))
        fin = np.isfinite(exp_logits)
        np.testing.assert_allclose(got[fin], exp_logits[fin], atol=atol * 50, rtol=1e-4)
        assert abs(out.loss.item() - exp_loss) < atol * 50
        assert (out.targets == 0).all()
        out.loss.backward()  # after the enqueue: no in-place modification of saved tensors
        assert torch.isfinite(tq.grad).all()


def make_batches(rng, steps, batch, dim, num_ids, k=None):
    out = []
    for _ in range(steps):
        labels = rng.integers(0, num_ids, batch)
        labels[1] = labels[0]  # repeated label inside the batch
        shape = (batch, k, dim) if k else (batch, dim)
        out.append((rng.normal(size=(batch, dim)), rng.normal(size=shape), labels))
    return out


@pytest.mark.parametrize("queue_size,batch", [(10, 4), (7, 3), (5, 8)])
def test_consecutive_steps_with_wraparound(rng, queue_size, batch):
    # queue sizes not divisible by the batch: the ring wraps in the middle of a batch
    head = DynamicClassQueue(embedding_size=6, queue_size=queue_size, scale=50.0, margin=0.3)
    ref = ReferenceDCQ(queue_size, 6, 50.0, 0.3)
    run_steps(head, ref, make_batches(rng, 6, batch, 6, num_ids=5))


def test_empty_queue_gives_zero_loss(rng):
    head = DynamicClassQueue(embedding_size=4, queue_size=8)
    q = torch.randn(3, 4, requires_grad=True)
    out = head(q, torch.tensor([0, 1, 2]), key=torch.randn(3, 4))
    assert out.loss.item() == pytest.approx(0.0, abs=1e-7)
    assert torch.isinf(out.logits[:, 1:]).all()
    out.loss.backward()
    assert torch.isfinite(q.grad).all() and not torch.isnan(out.loss)


def test_own_label_masked_in_queue():
    head = DynamicClassQueue(embedding_size=3, queue_size=4, scale=1.0, margin=0.0)
    head.queue.enqueue(torch.eye(3)[:2], torch.tensor([7, 9]))
    out = head(torch.tensor([[1.0, 0, 0]]), torch.tensor([7]), key=torch.tensor([[0, 0, 1.0]]))
    # slot 0 holds label 7 (own identity): masked; slot 1 (label 9) is a negative; 2, 3 empty
    assert torch.isinf(out.logits[0, 1]) and out.logits[0, 2].item() == pytest.approx(0.0)
    assert torch.isinf(out.logits[0, 3:]).all()


def test_bf16_inputs(rng):
    head = DynamicClassQueue(embedding_size=8, queue_size=9, scale=50.0, margin=0.3)
    ref = ReferenceDCQ(9, 8, 50.0, 0.3)
    run_steps(head, ref, make_batches(rng, 4, 4, 8, num_ids=6), dtype=torch.bfloat16)
    assert head.queue.weights.dtype == torch.float32


def test_arcface_positive(rng):
    head = DynamicClassQueue(embedding_size=5, queue_size=6, scale=30.0, margin=0.5, margin_type="arcface")
    q, k = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    out = head(torch.tensor(q, dtype=torch.float32), torch.tensor([0, 1, 2]), key=torch.tensor(k, dtype=torch.float32))
    cos = np.sum(normalise(q) * normalise(k), axis=1)
    theta = np.arccos(cos)
    expected = 30.0 * np.where(theta <= math.pi - 0.5, np.cos(theta + 0.5), cos - 0.5 * math.sin(0.5))
    np.testing.assert_allclose(out.logits[:, 0].detach().numpy(), expected, atol=1e-3)


def test_in_batch_negatives(rng):
    head = DynamicClassQueue(embedding_size=6, queue_size=5, in_batch_negatives=True)
    ref = ReferenceDCQ(5, 6, 50.0, 0.3, in_batch=True)
    run_steps(head, ref, make_batches(rng, 4, 4, 6, num_ids=4))


def test_dedup_keeps_only_newest_entry(rng):
    head = DynamicClassQueue(embedding_size=6, queue_size=11, dedup=True)
    ref = ReferenceDCQ(11, 6, 50.0, 0.3, dedup=True)
    run_steps(head, ref, make_batches(rng, 6, 4, 6, num_ids=3))  # few identities: many duplicates


def test_k_references_averaged(rng):
    head = DynamicClassQueue(embedding_size=6, queue_size=7)
    ref = ReferenceDCQ(7, 6, 50.0, 0.3)
    run_steps(head, ref, make_batches(rng, 4, 3, 6, num_ids=5, k=3))


def test_gradient_reaches_query_only():
    head = DynamicClassQueue(embedding_size=4, queue_size=6)
    head.queue.enqueue(torch.randn(5, 4), torch.tensor([5, 6, 7, 8, 9]))
    q = torch.randn(3, 4, requires_grad=True)
    k = torch.randn(3, 4, requires_grad=True)
    out = head(q, torch.tensor([0, 1, 2]), key=k)
    out.loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None
    assert not head.queue.weights.requires_grad and head.queue.weights.grad is None
    assert list(head.parameters()) == []


def test_gradient_matches_finite_differences_of_reference(rng):
    head = DynamicClassQueue(embedding_size=4, queue_size=6, scale=5.0, margin=0.2)
    qw, ql = normalise(rng.normal(size=(6, 4))), np.array([3, 4, 5, 6, 0, 3])
    head.queue.enqueue(torch.tensor(qw, dtype=torch.float32), torch.tensor(ql))
    q, k, labels = rng.normal(size=(2, 4)), rng.normal(size=(2, 4)), np.array([0, 1])
    tq = torch.tensor(q, dtype=torch.float32, requires_grad=True)
    head(tq, torch.tensor(labels), key=torch.tensor(k, dtype=torch.float32)).loss.backward()

    def ref_loss(x):
        ref = ReferenceDCQ(6, 4, 5.0, 0.2)
        ref.w[:], ref.l[:] = qw, ql
        return ref.step(x, k, labels)[1]

    eps, numeric = 1e-6, np.zeros_like(q)
    for idx in np.ndindex(q.shape):
        plus, minus = q.copy(), q.copy()
        plus[idx] += eps
        minus[idx] -= eps
        numeric[idx] = (ref_loss(plus) - ref_loss(minus)) / (2 * eps)
    np.testing.assert_allclose(tq.grad.numpy(), numeric, atol=1e-4)


def test_missing_key_is_a_clear_error():
    head = DynamicClassQueue(embedding_size=4, queue_size=6)
    with pytest.raises(ValueError, match="needs key="):
        head(torch.randn(3, 4), torch.tensor([0, 1, 2]))


def test_every_head_takes_the_same_call():
    """head(embeddings, labels, key=key) on all three heads; FC and Partial FC ignore the key."""
    from dcq import FullFC, PartialFC

    emb, labels, key = torch.randn(4, 6), torch.tensor([0, 1, 2, 1]), torch.randn(4, 6)
    for head in (DynamicClassQueue(embedding_size=6, queue_size=5), FullFC(6, 3), PartialFC(6, 3, sample_rate=0.5)):
        out = head(emb, labels, key=key)
        assert out.loss.ndim == 0 and out.logits.shape[0] == 4 and out.targets.shape == (4,)
        assert isinstance(head.metrics(), dict)
    assert DynamicClassQueue(embedding_size=6, queue_size=5).metrics() == {"queue_fill": 0.0}
