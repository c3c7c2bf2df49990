import numpy as np
import onnxruntime as ort
import torch

from dcq.cli import main
from dcq.models import get_backbone
from dcq.checkpoint import save_checkpoint


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
