import math

import numpy as np
import pytest
import torch

from dcq.heads.margins import Margin, make_margin


def reference_target(cos, m1, m2, m3):
    """Explicit per-element margin, insightface's non-easy-margin convention for m1 == 1."""
    out = []
    for c in cos:
        theta = math.acos(min(max(c, -1 + 1e-7), 1 - 1e-7))
        if m1 == 1.0 and m2 > 0:
            v = math.cos(theta + m2) if theta <= math.pi - m2 else c - m2 * math.sin(m2)
        elif m1 == 1.0:
            v = c
        else:
            b = (math.pi - m2) / m1
            v = math.cos(m1 * theta + m2) if theta <= b else c - 1 - math.cos(b)
        out.append(v - m3)
    return np.array(out)


COS = np.array([-1.0, -0.999, -0.9, -0.5, 0.0, 0.3, 0.7, 0.95, 1.0])


@pytest.mark.parametrize(
    "kind,margin,params",
    [("cosface", 0.35, (1, 0, 0.35)), ("arcface", 0.5, (1, 0.5, 0)), ("combined", (1.0, 0.3, 0.2), (1, 0.3, 0.2)),
     ("combined", (1.35, 0.0, 0.0), (1.35, 0, 0))],
)
def test_target_matches_reference(kind, margin, params):
    m = make_margin(kind, 64.0, margin)
    got = m.target_logit(torch.tensor(COS, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, reference_target(COS, *params), atol=1e-6)


def test_arcface_monotone_and_finite_past_pi():
    m = make_margin("arcface", 64.0, 0.5)
    cos = torch.linspace(-1, 1, 2001, requires_grad=True)
    t = m.target_logit(cos)
    assert torch.isfinite(t).all()
    assert (t[1:] - t[:-1] >= -1e-6).all(), "target logit must not decrease as cos grows"
    t.sum().backward()
    assert torch.isfinite(cos.grad).all()


def test_apply_scales_and_touches_only_targets():
    m = Margin(scale=10.0, m3=0.2)
    cos = torch.tensor([[0.1, 0.5, -0.2], [0.3, 0.3, 0.9]])
    out = m.apply(cos, torch.tensor([1, 2]))
    expected = torch.tensor([[1.0, 3.0, -2.0], [3.0, 3.0, 7.0]])
    assert torch.allclose(out, expected)


def test_unknown_margin_type():
    with pytest.raises(ValueError, match="unknown margin_type"):
        make_margin("sphere", 1.0, 0.1)
