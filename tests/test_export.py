import os

import numpy as np
import onnxruntime as ort
import pytest
import torch

from dcq.checkpoint import save_checkpoint
from dcq.cli import main
from dcq.models import get_backbone


def test_export_matches_torch_with_dynamic_batch(tmp_path, capsys):
    torch.manual_seed(0)
    net = get_backbone("cpunet", embedding_size=16, image_size=32)
    net.eval()
    ckpt = save_checkpoint(tmp_path / "final.pt", {
        "model": {"backbone": "cpunet", "embedding_size": 16, "image_size": 32},
        "feature_extractor": net.state_dict(), "weight_generator": net.state_dict()})
    out = tmp_path / "m.onnx"
    assert main(["export", str(ckpt), "--onnx", str(out)]) == 0
    assert "onnxruntime max |diff|" in capsys.readouterr().out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.rand(7, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = net(x).numpy()
    got = session.run(None, {"images": x.numpy()})[0]
    assert got.shape == (7, 16)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_export_rejects_non_checkpoint(tmp_path, capsys):
    bogus = tmp_path / "x.pt"
    bogus.write_bytes(b"not a checkpoint")
    assert main(["export", str(bogus), "--onnx", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "not a loadable dcq checkpoint" in err and err.count("\n") == 1


def _iresnet_checkpoint(tmp_path, name):
    """An iresnet at the smallest size it takes (16 px) with ordinary, non-trivial BatchNorm statistics:
    raw embeddings of norm in the thousands, as a trained model has."""
    torch.manual_seed(0)
    net = get_backbone(name, embedding_size=32, image_size=16)
    for m in net.modules():  # every BatchNorm holds the statistics of real activations ...
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.momentum = None
    with torch.no_grad():
        net.train()(torch.rand(8, 3, 16, 16) * 2 - 1)
        net.head.features.running_var *= 1e-6  # ... and the embedding comes out ~1000x larger
        net.eval()
        norms = net(torch.rand(2, 3, 16, 16) * 2 - 1).norm(dim=1)
    assert torch.isfinite(norms).all() and norms.min() > 1000
    return save_checkpoint(tmp_path / f"{name}.pt", {
        "model": {"backbone": name, "embedding_size": 32, "image_size": 16},
        "feature_extractor": net.state_dict(), "weight_generator": None})


@pytest.mark.parametrize("name", ["iresnet18", "iresnet50"])
def test_export_accepts_a_real_iresnet_at_default_settings(tmp_path, capsys, name):
    out = tmp_path / "m.onnx"
    assert main(["export", str(_iresnet_checkpoint(tmp_path, name)), "--onnx", str(out)]) == 0
    assert out.is_file() and oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_broken_graph_is_refused_and_the_previous_export_kept(tmp_path, capsys, monkeypatch):
    import onnx

    from dcq import export

    ckpt = _iresnet_checkpoint(tmp_path, "iresnet18")
    out = tmp_path / "m.onnx"
    out.write_bytes(b"the previous, good export")
    real_export = export.export_onnx

    def broken(encoder, image_size, path, opset=17):
        real_export(encoder, image_size, path, opset)
        model = onnx.load(str(path))
        for init in model.graph.initializer:  # perturb the embedding layer's weights
            if len(init.dims) == 2:
                w = onnx.numpy_helper.to_array(init).copy()
                w[:, : w.shape[1] // 2] *= -1
                init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
        onnx.save(model, str(path))
        return path

    monkeypatch.setattr(export, "export_onnx", broken)
    assert main(["export", str(ckpt), "--onnx", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "differs from PyTorch" in err and "previous file is untouched" in err
    assert out.read_bytes() == b"the previous, good export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iresnet18.pt", "m.onnx"]


def test_an_unsupported_opset_is_one_line_and_writes_nothing(tmp_path, capsys):
    net = get_backbone("cpunet", embedding_size=8, image_size=16)
    ckpt = save_checkpoint(tmp_path / "c.pt", {"model": {"backbone": "cpunet", "embedding_size": 8,
                                                         "image_size": 16}, "feature_extractor": net.state_dict()})
    assert main(["export", str(ckpt), "--onnx", str(tmp_path / "m.onnx"), "--opset", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--opset 5" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
