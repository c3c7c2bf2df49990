import pytest
import torch

from dcq.models import get_backbone
from dcq.models.iresnet import LAYERS


def analytic_iresnet_params(layers, emb=512, widths=(64, 128, 256, 512), spatial=7):
    """Parameter count of insightface's IR-ResNet written out from the architecture."""
    bn = lambda c: 2 * c  # noqa: E731 (weight + bias)
    n = 3 * widths[0] * 9 + bn(widths[0]) + widths[0]  # stem conv, bn, prelu
    cin = widths[0]
    for blocks, cout in zip(layers, widths):
        for b in range(blocks):
            c_in = cin if b == 0 else cout
            n += bn(c_in) + c_in * cout * 9 + bn(cout) + cout + cout * cout * 9 + bn(cout)
            if b == 0:
                n += c_in * cout + bn(cout)  # 1x1 downsample + bn
        cin = cout
    n += bn(cin) + cin * spatial * spatial * emb + emb + bn(emb)  # bn2, fc, features
    return n


# insightface arcface_torch model zoo: r50 43.6M parameters, r100 65.2M.
PUBLISHED = {"iresnet50": 43.6e6, "iresnet100": 65.2e6}


@pytest.mark.parametrize("name", ["iresnet50", "iresnet100"])
def test_parameter_counts_match_published(name):
    model = get_backbone(name)
    count = sum(p.numel() for p in model.parameters())
    assert count == analytic_iresnet_params(LAYERS[name])
    assert abs(count - PUBLISHED[name]) / PUBLISHED[name] < 0.002


def test_iresnet_output_shape():
    model = get_backbone("iresnet18").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 512)


def test_cpunet_shapes_and_sizes():
    for size in (32, 40, 48, 64):
        model = get_backbone("cpunet", embedding_size=128, image_size=size)
        assert model(torch.randn(3, 3, size, size)).shape == (3, 128)


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown backbone"):
        get_backbone("resnet9000")


def test_embedding_bn_scale_fixed():
    model = get_backbone("cpunet", embedding_size=16, image_size=32)
    assert not model.head.features.weight.requires_grad
