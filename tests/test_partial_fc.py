import numpy as np
import pytest
import torch

from dcq import FullFC, PartialFC


def test_sample_rate_one_equals_full_fc(rng):
    torch.manual_seed(0)
    fc = FullFC(6, 9, scale=64.0, margin=0.5)
    pfc = PartialFC(6, 9, sample_rate=1.0, scale=64.0, margin=0.5)
    pfc.weight.copy_(fc.weight.detach())
    emb = torch.tensor(rng.normal(size=(5, 6)), dtype=torch.float32)
    labels = torch.tensor([0, 4, 4, 8, 1])
    e1, e2 = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    o1, o2 = fc(e1, labels), pfc(e2, labels)
    assert o1.loss.item() == pytest.approx(o2.loss.item(), abs=1e-6)
    o1.loss.backward()
    o2.loss.backward()
    assert torch.allclose(e1.grad, e2.grad, atol=1e-6)
    assert torch.allclose(fc.weight.grad, pfc.sub_weight.grad, atol=1e-6)


def test_sample_rate_one_trains_like_full_fc(rng):
    torch.manual_seed(0)
    fc = FullFC(6, 9)
    pfc = PartialFC(6, 9, sample_rate=1.0)
    pfc.weight.copy_(fc.weight.detach())
    opt1 = torch.optim.SGD(fc.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt2 = torch.optim.SGD(pfc.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    pfc.bind_optimizer(opt2)
    for _ in range(4):
        emb = torch.tensor(rng.normal(size=(5, 6)), dtype=torch.float32)
        labels = torch.tensor(rng.integers(0, 9, 5))
        for head, opt in ((fc, opt1), (pfc, opt2)):
            opt.zero_grad()
            head(emb, labels).loss.backward()
            opt.step()
    assert torch.allclose(fc.weight.detach(), pfc.weight, atol=1e-5)


def test_two_bound_heads_stay_apart(rng):
    """Each head acts only on the steps of the optimiser it is bound to: two identical heads stay
    identical while a third head's optimiser steps beside them."""
    torch.manual_seed(0)
    a, b = PartialFC(6, 40, sample_rate=0.25, seed=1), PartialFC(6, 40, sample_rate=0.25, seed=1)
    b.weight.copy_(a.weight)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    other = PartialFC(6, 40, sample_rate=0.25)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    for head, opt in ((a, opt_a), (b, opt_b), (other, other_opt)):
        head.bind_optimizer(opt)
    for _ in range(3):
        emb = torch.tensor(rng.normal(size=(5, 6)), dtype=torch.float32)
        labels = torch.tensor(rng.integers(0, 40, 5))
        for head, opt in ((a, opt_a), (b, opt_b), (other, other_opt)):
            opt.zero_grad()
            head(emb, labels).loss.backward()
            opt.step()
    assert torch.equal(a.weight, b.weight) and torch.equal(a.state_momentum_buffer, b.state_momentum_buffer)
    assert not torch.equal(a.weight, other.weight)


def test_importing_dcq_registers_no_global_optimiser_hooks():
    import torch.optim.optimizer as optimizer_module

    import dcq.heads.partial_fc  # noqa: F401

    assert not optimizer_module._global_optimizer_pre_hooks and not optimizer_module._global_optimizer_post_hooks


def test_an_unbound_optimiser_step_is_caught_at_the_next_forward():
    pfc = PartialFC(4, 50, sample_rate=0.2, seed=2)
    opt = torch.optim.SGD(pfc.parameters(), lr=0.5)
    labels = torch.tensor([1, 2, 3])
    pfc(torch.randn(3, 4), labels)  # forward-only use (no step) is fine
    pfc(torch.randn(3, 4), labels).loss.backward()
    opt.step()  # sub_weight changed, but nothing scatters it back into weight
    with pytest.raises(ValueError, match="bind_optimizer"):
        pfc(torch.randn(3, 4), labels)


def test_positives_always_sampled_and_targets_remapped():
    pfc = PartialFC(4, 1000, sample_rate=0.05, seed=3)
    labels = torch.tensor([5, 999, 5, 321, 0])
    for _ in range(20):
        index, targets = pfc.sample(labels)
        assert index.numel() == 50
        assert torch.all(index[1:] > index[:-1])  # sorted, unique
        assert torch.equal(index[targets], labels)  # remapped targets point at the right classes


def test_only_sampled_rows_change_including_momentum(rng):
    torch.manual_seed(0)
    pfc = PartialFC(4, 200, sample_rate=0.1, seed=1)
    opt = torch.optim.SGD(pfc.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    pfc.bind_optimizer(opt)
    sampled, momentum_after = [], []
    for step in range(3):
        before_w = pfc.weight.clone()
        before_m = pfc.state_momentum_buffer.clone() if hasattr(pfc, "state_momentum_buffer") else None
        labels = torch.tensor(rng.integers(0, 200, 6))
        opt.zero_grad()
        pfc(torch.randn(6, 4), labels).loss.backward()
        index = pfc._pending.clone()
        opt.step()
        changed = (pfc.weight != before_w).any(dim=1)
        not_sampled = torch.ones(200, dtype=torch.bool)
        not_sampled[index] = False
        assert not changed[not_sampled].any(), "a row outside the sample changed"
        assert changed[labels].all()
        if before_m is not None:
            m_changed = (pfc.state_momentum_buffer != before_m).any(dim=1)
            assert not m_changed[not_sampled].any(), "momentum of an unsampled row changed"
        sampled.append(set(index.tolist()))
        momentum_after.append(pfc.state_momentum_buffer.clone())
    # momentum of a row sampled at step 0 but never again was kept, not reset
    kept = sorted(sampled[0] - sampled[1] - sampled[2])
    assert kept
    assert torch.equal(pfc.state_momentum_buffer[kept], momentum_after[0][kept])
    assert (pfc.state_momentum_buffer[kept].abs().sum(dim=1) > 0).all()


def test_momentum_state_matches_manual_sgd(rng):
    """Row-wise SGD with momentum written out by hand for two steps."""
    torch.manual_seed(0)
    pfc = PartialFC(3, 10, sample_rate=0.3, seed=5)
    w = pfc.weight.clone().double().numpy()
    mom = np.zeros_like(w)
    lr, mu, wd = 0.1, 0.9, 0.01
    opt = torch.optim.SGD(pfc.parameters(), lr=lr, momentum=mu, weight_decay=wd)
    pfc.bind_optimizer(opt)
    for _ in range(3):
        labels = torch.tensor(rng.integers(0, 10, 2))
        opt.zero_grad()
        pfc(torch.randn(2, 3), labels).loss.backward()
        index = pfc._pending.numpy()
        grad = pfc.sub_weight.grad.double().numpy() + wd * w[index]
        mom[index] = mu * mom[index] + grad
        w[index] -= lr * mom[index]
        opt.step()
        np.testing.assert_allclose(pfc.weight.double().numpy(), w, rtol=1e-6, atol=1e-6)  # float32 steps


def test_state_dict_round_trip():
    pfc = PartialFC(4, 50, sample_rate=0.2)
    opt = torch.optim.SGD(pfc.parameters(), lr=0.1, momentum=0.9)
    pfc.bind_optimizer(opt)
    opt.zero_grad()
    pfc(torch.randn(3, 4), torch.tensor([1, 2, 3])).loss.backward()
    opt.step()
    sd = pfc.state_dict()
    assert "sub_weight" not in sd and "state_momentum_buffer" in sd
    other = PartialFC(4, 50, sample_rate=0.2, seed=99)
    other.load_state_dict(sd)
    assert torch.equal(other.weight, pfc.weight)
    assert torch.equal(other.sample(torch.tensor([1]))[0], pfc.sample(torch.tensor([1]))[0])


def test_bind_requires_sub_weight():
    pfc = PartialFC(4, 10)
    with pytest.raises(ValueError):
        pfc.bind_optimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
