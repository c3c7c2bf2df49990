import torch
from torch import nn

from dcq import MomentumEncoder
from dcq.models import get_backbone


def tiny():
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))


def test_ema_update_matches_formula():
    torch.manual_seed(0)
    online = tiny()
    gen = MomentumEncoder(online, momentum=0.9)
    before = [p.clone() for p in gen.encoder.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    online(torch.randn(8, 4))  # moves the online BN running stats
    gen.update(online)
    for b, p_k, p_q in zip(before, gen.encoder.parameters(), online.parameters()):
        assert torch.allclose(p_k, 0.9 * b + 0.1 * p_q)
    bn_k, bn_q = gen.encoder[1], online[1]
    assert torch.allclose(bn_k.running_mean, 0.1 * bn_q.running_mean)  # EMA from zeros
    assert int(bn_k.num_batches_tracked) == int(bn_q.num_batches_tracked)


def test_never_trained_and_no_grad():
    online = tiny()
    gen = MomentumEncoder(online)
    assert all(not p.requires_grad for p in gen.parameters())
    x = torch.randn(5, 4, requires_grad=True)
    out = gen(x)
    assert not out.requires_grad
    opt = torch.optim.SGD(online.parameters(), lr=0.1)
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not ids & {id(p) for p in gen.parameters()}


def test_keys_use_train_mode_batch_stats():
    torch.manual_seed(0)
    online = tiny()
    gen = MomentumEncoder(online)
    gen.train()
    x = torch.randn(16, 4) * 3 + 5
    out_train = gen(x)
    gen.eval()
    out_eval = gen(x)
    assert not torch.allclose(out_train, out_eval)  # batch stats vs running stats


def test_bn_splits_restores_order():
    """Train mode (as keys are computed): each shuffled group is normalised with its own batch
    statistics, and every output row is restored to its input's position."""
    torch.manual_seed(0)
    backbone = get_backbone("cpunet", embedding_size=8, image_size=16)
    gen = MomentumEncoder(backbone, bn_splits=2)
    gen.train()
    x = torch.randn(8, 3, 16, 16)
    torch.manual_seed(1)
    out = gen(x)
    torch.manual_seed(1)
    perm = torch.randperm(8)
    with torch.no_grad():
        expected = torch.empty_like(out)
        expected[perm] = torch.cat([gen.encoder(chunk) for chunk in x[perm].chunk(2)])
        plain = gen.encoder(x)
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out, plain, atol=1e-3)  # the split changes the statistics: it is not ignored


def test_momentum_one_freezes_and_zero_copies():
    online, other = tiny(), tiny()
    gen = MomentumEncoder(online, momentum=1.0)
    snap = [p.clone() for p in gen.parameters()]
    gen.update(other)
    assert all(torch.equal(a, b) for a, b in zip(snap, gen.parameters()))
    gen.update(other, momentum=0.0)
    assert all(torch.equal(a, b) for a, b in zip(gen.encoder.parameters(), other.parameters()))
