import math

import numpy as np
import pytest
import torch

from dcq import FullFC


def reference_loss(emb, weight, labels, s, m, kind):
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    w = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    losses = []
    for i in range(len(e)):
        row = []
        for c in range(len(w)):
            cos = float(e[i] @ w[c])
            if c == labels[i]:
                if kind == "cosface":
                    cos = cos - m
                else:
                    theta = math.acos(min(max(cos, -1 + 1e-7), 1 - 1e-7))
                    cos = math.cos(theta + m) if theta <= math.pi - m else cos - m * math.sin(m)
            row.append(s * cos)
        row = np.array(row)
        mx = row.max()
        losses.append(-(row[labels[i]] - mx - math.log(np.exp(row - mx).sum())))
    return float(np.mean(losses))


@pytest.mark.parametrize("kind,s,m", [("arcface", 64.0, 0.5), ("cosface", 30.0, 0.35)])
def test_loss_matches_reference(rng, kind, s, m):
    head = FullFC(5, 7, scale=s, margin=m, margin_type=kind)
    emb = rng.normal(size=(6, 5))
    labels = np.array([0, 3, 3, 6, 2, 0])
    out = head(torch.tensor(emb, dtype=torch.float32), torch.tensor(labels))
    expected = reference_loss(emb, head.weight.detach().double().numpy(), labels, s, m, kind)
    assert out.loss.item() == pytest.approx(expected, rel=1e-4)
    assert out.logits.shape == (6, 7) and torch.equal(out.targets, torch.tensor(labels))


def test_bf16_embeddings(rng):
    head = FullFC(8, 5, scale=64.0, margin=0.5)
    emb = torch.tensor(rng.normal(size=(4, 8)), dtype=torch.bfloat16, requires_grad=True)
    labels = np.array([1, 2, 3, 4])
    out = head(emb, torch.tensor(labels))
    expected = reference_loss(emb.detach().float().numpy(), head.weight.detach().numpy(), labels, 64.0, 0.5, "arcface")
    assert out.loss.item() == pytest.approx(expected, rel=1e-3)
    out.loss.backward()
    assert emb.grad.dtype == torch.bfloat16 and torch.isfinite(emb.grad.float()).all()


def test_label_out_of_range():
    head = FullFC(4, 3)
    with pytest.raises(ValueError, match="out of range"):
        head(torch.randn(2, 4), torch.tensor([0, 3]))
