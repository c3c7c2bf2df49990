"""arcface_torch's backbones in dcq: names, cost against published numbers, every command accepts them."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dcq.checkpoint import save_checkpoint
from dcq.cli import main
from dcq.errors import DcqError
from dcq.models import BACKBONES, get_backbone
from dcq.models.complexity import multiply_adds, parameter_count
from dcq.train.config import build_config

# insightface arcface_torch's model table, "GFLOPs" (multiply-adds) at 112 px, 512-d embeddings.
PUBLISHED_GMACS = {"r50": 6.3, "mbf": 0.45, "vit_t": 1.5, "vit_s": 5.7, "vit_b": 11.4}
NEW_NAMES = ["r18", "r34", "r50", "r100", "r200", "mbf", "vit_t", "vit_s", "vit_b"]


@pytest.mark.parametrize("name", sorted(PUBLISHED_GMACS))
def test_multiply_adds_within_ten_percent_of_arcface_torch(name):
    measured = multiply_adds(name) / 1e9
    assert abs(measured - PUBLISHED_GMACS[name]) / PUBLISHED_GMACS[name] < 0.10, measured


def iresnet_macs_by_hand(layers, emb=512, size=112, widths=(64, 128, 256, 512)):
    """Multiply-adds of every convolution and the FC of an IR-ResNet, from the architecture."""
    total = size * size * 3 * widths[0] * 9  # stem 3x3 at full resolution
    cin, res = widths[0], size
    for blocks, cout in zip(layers, widths):
        for b in range(blocks):
            c_in = cin if b == 0 else cout
            total += res * res * c_in * cout * 9  # conv1, stride 1, at the input resolution
            out = res // 2 if b == 0 else res
            total += out * out * cout * cout * 9  # conv2, stride 2 in the first block
            if b == 0:
                total += out * out * c_in * cout  # 1x1 downsample
            res = out
        cin = cout
    return total + cin * res * res * emb  # fc


def vit_macs_by_hand(dim, depth, emb=512, tokens=144, patch=9):
    per_block = tokens * 12 * dim * dim + 2 * tokens * tokens * dim  # qkv+proj+mlp(4x); q k^T and weights v
    return tokens * dim * 3 * patch * patch + depth * per_block + tokens * dim * dim + dim * emb


def test_counted_multiply_adds_equal_the_architecture_written_out():
    assert multiply_adds("r18") == iresnet_macs_by_hand((2, 2, 2, 2))
    assert multiply_adds("r50") == iresnet_macs_by_hand((3, 4, 14, 3))
    assert multiply_adds("r50", embedding_size=128, image_size=64) == iresnet_macs_by_hand((3, 4, 14, 3), 128, 64)
    assert multiply_adds("vit_t") == vit_macs_by_hand(256, 12)
    assert multiply_adds("vit_b") == vit_macs_by_hand(512, 24)


def test_mbf_parameters_written_out():
    def bottleneck(cin, cout, hidden):  # 1x1 conv+BN+PReLU, depthwise 3x3+BN+PReLU, 1x1 conv+BN
        return cin * hidden + 3 * hidden + hidden * 9 + 3 * hidden + hidden * cout + 2 * cout

    n = 3 * 128 * 9 + 3 * 128 + 128 * 2 * 9 + 3 * 128  # stem; grouped 3x3 (64 groups of 2 channels)
    n += bottleneck(128, 128, 128) + 4 * bottleneck(128, 128, 128)
    n += bottleneck(128, 256, 256) + 6 * bottleneck(256, 256, 256)
    n += bottleneck(256, 256, 512) + 2 * bottleneck(256, 256, 256)
    n += 256 * 512 + 3 * 512  # conv_sep
    n += 512 * 49 + 2 * 512 + 512 * 512 + 2 * 512  # GDC 7x7 depthwise + BN, linear, BN1d
    assert parameter_count("mbf") == n


def test_arcface_names_are_the_iresnets():
    for depth in (18, 34, 50, 100, 200):
        with torch.device("meta"):
            a, b = get_backbone(f"r{depth}"), get_backbone(f"iresnet{depth}")
        assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert set(NEW_NAMES) <= set(BACKBONES)


@pytest.mark.parametrize("name,size", [("mbf", 16), ("mbf", 32), ("vit_t", 18), ("vit_s", 27)])
def test_forward_shapes_train_and_eval(name, size):
    net = get_backbone(name, embedding_size=24, image_size=size)
    x = torch.randn(3, 3, size, size)
    assert net.train()(x).shape == (3, 24)
    with torch.no_grad():
        assert net.eval()(x).shape == (3, 24)


def test_vit_token_masking_is_random_in_training_only():
    torch.manual_seed(0)
    net = get_backbone("vit_t", embedding_size=8, image_size=36)
    x = torch.randn(4, 3, 36, 36)
    net.train()
    assert not torch.allclose(net(x), net(x))  # another random subset of tokens each call
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), net(x))
    # Every token masked: the blocks see nothing and every image becomes the same row of mask tokens,
    # so the embedding no longer depends on the input (checks the put-back path).
    full = get_backbone("vit_t", embedding_size=8, image_size=36, mask_ratio=1.0, drop_path=0.0).train()
    full.feature.eval()  # the projection's BatchNorm on running statistics: identical rows keep a gradient
    out = full(torch.randn(4, 3, 36, 36))
    assert torch.allclose(out, out[:1].expand_as(out), atol=1e-5)
    out.sum().backward()
    assert full.mask_token.grad is not None and full.mask_token.grad.abs().sum() > 0


def test_image_sizes_they_cannot_take_are_one_line_config_errors():
    with pytest.raises(DcqError, match="mbf takes image sizes divisible by 16"):
        build_config({"backbone": "mbf", "image_size": 40}, "test")
    with pytest.raises(DcqError, match="at least 18 px, cut into 9 px patches"):
        build_config({"backbone": "vit_t", "image_size": 9}, "test")
    with pytest.raises(DcqError, match="did you mean mbf"):
        build_config({"backbone": "mfb"}, "test")
    assert build_config({"backbone": "r100", "image_size": 112}, "test").backbone == "r100"


def _checkpoint(path, name, size, dim=16):
    torch.manual_seed(0)
    net = get_backbone(name, embedding_size=dim, image_size=size)
    with torch.no_grad():  # BatchNorm statistics of real activations
        net.train()(torch.rand(8, 3, size, size) * 2 - 1)
    return save_checkpoint(path, {"model": {"backbone": name, "embedding_size": dim, "image_size": size},
                                  "feature_extractor": net.state_dict(), "weight_generator": None,
                                  "threshold": 0.3})


def _png(path, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return str(path)


@pytest.mark.parametrize("name,size", [("mbf", 32), ("vit_t", 36), ("r18", 16)])
def test_eval_embed_verify_export_accept_them(tmp_path, capsys, name, size):
    from dcq.data import write_bin

    ckpt = str(_checkpoint(tmp_path / "m.pt", name, size))
    a, b = _png(tmp_path / "a.png", 1), _png(tmp_path / "b.png", 2)
    pairs = [_png(tmp_path / f"p{i}.png", 10 + i) for i in range(20)]
    write_bin(tmp_path / "pairs.bin", [open(p, "rb").read() for p in pairs], [i % 2 == 0 for i in range(10)])
    assert main(["eval", ckpt, "--bin", str(tmp_path / "pairs.bin"), "--json", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["pairs"]["pairs"] == 10
    assert main(["embed", ckpt, a, b, "--out", str(tmp_path / "e.npy")]) == 0
    emb = np.load(tmp_path / "e.npy")
    assert emb.shape == (2, 16) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert main(["verify", ckpt, a, b]) == 0
    assert f"cosine similarity: {float(emb[0] @ emb[1]):.4f}" in capsys.readouterr().out
    assert main(["export", ckpt, "--onnx", str(tmp_path / "m.onnx")]) == 0
    assert "onnxruntime max |diff|" in capsys.readouterr().out


@pytest.mark.parametrize("name,size", [("vit_t", 18), ("r18", 16)])
def test_train_takes_them(tiny_dataset, tmp_path, name, size):
    from dcq.train.loop import train

    cfg = build_config({"backbone": name, "embedding_size": 16, "image_size": size, "batch_size": 8,
                        "train_data": str(tiny_dataset), "output": str(tmp_path / "run"), "max_steps": 2,
                        "workers": 0, "progress": False, "checkpoint_every": 0, "queue_size": 8, "threads": 1},
                       "test")
    summary = train(cfg)
    assert summary["steps"] == 2 and np.isfinite(summary["last_loss"])
