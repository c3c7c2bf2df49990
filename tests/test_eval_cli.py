"""`dcq eval` / `dcq embed` / `dcq verify` end to end on a tiny cpunet checkpoint."""

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcq.cli import main
from dcq.data import write_bin
from dcq.errors import DcqError
from dcq.eval import embed_images, evaluate_bin
from dcq.models import get_backbone
from dcq.checkpoint import build_eval_encoder, load_checkpoint, save_checkpoint

SIZE, DIM = 16, 16
VERIFY_KEYS = {"accuracy", "accuracy_std", "threshold", "pairs", "tar_at_far"}
FAR_KEYS = ["1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"]


def png(rng, size=SIZE) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def net(seed):
    torch.manual_seed(seed)
    return get_backbone("cpunet", embedding_size=DIM, image_size=SIZE)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalcli")
    rng = np.random.default_rng(0)
    fe, wg = net(1), net(2)
    model = {"backbone": "cpunet", "embedding_size": DIM, "image_size": SIZE}
    save_checkpoint(d / "dcq.pt", {"model": model, "feature_extractor": fe.state_dict(),
                                   "weight_generator": wg.state_dict(), "threshold": 0.25})
    save_checkpoint(d / "fc.pt", {"model": model, "feature_extractor": fe.state_dict(), "weight_generator": None})
    base = [png(rng) for _ in range(20)]
    images, issame = [], []
    for i in range(20):  # positives: an image and a slightly perturbed copy; negatives: two different images
        a = base[i]
        if i % 2 == 0:
            arr = np.array(Image.open(io.BytesIO(a)))
            arr = np.clip(arr.astype(int) + rng.integers(-20, 21, arr.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            images += [a, buf.getvalue()]
        else:
            images += [a, base[(i + 7) % 20]]
        issame.append(i % 2 == 0)
    write_bin(d / "tiny.bin", images, issame)
    write_bin(d / "other.bin", images[::-1], issame[::-1])
    (d / "imgs" / "sub").mkdir(parents=True)
    for k in range(5):
        (d / "imgs" / ("sub" if k % 2 else "") / f"{k}.png").write_bytes(base[k])
    return d


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_eval_json_has_exactly_the_design_keys(files, capsys, tmp_path):
    out_json = tmp_path / "res" / "metrics.json"
    rc, out, _ = run(capsys, "eval", files / "dcq.pt", "--bin", files / "tiny.bin", files / "other.bin",
                     "--json", out_json, "--plots", tmp_path / "plots")
    assert rc == 0
    assert "weight generator (EMA) embeddings, as in the DCQ paper" in out
    assert "| tiny | 20 |" in out and "| other | 20 |" in out
    data = json.loads(out_json.read_text())
    assert list(data) == ["tiny", "other"]
    for res in data.values():
        assert set(res) == VERIFY_KEYS
        assert list(res["tar_at_far"]) == FAR_KEYS
        assert res["pairs"] == 20 and 0 <= res["accuracy"] <= 1
    # the numbers are those of the weight generator, evaluated directly
    encoder, info = build_eval_encoder(load_checkpoint(files / "dcq.pt"))
    assert info["which"] == "weight_generator"
    direct = evaluate_bin(encoder, files / "tiny.bin", SIZE)
    assert data["tiny"]["tar_at_far"] == pytest.approx(direct.pop("tar_at_far"))
    assert {k: data["tiny"][k] for k in direct} == pytest.approx(direct)
    assert os.listdir(out_json.parent) == ["metrics.json"]  # atomic write left no temp file
    assert (tmp_path / "plots" / "roc.png").read_bytes()[:4] == b"\x89PNG"


def test_feature_extractor_checkpoint_says_so(files, capsys, tmp_path):
    rc, out, _ = run(capsys, "eval", files / "fc.pt", "--bin", files / "tiny.bin", "--no-flip")
    assert rc == 0
    assert "feature extractor embeddings" in out and "(EMA)" not in out


def test_hostile_bin_is_refused(files, capsys, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.bin"
    bad.write_bytes(pickle.dumps(([b"a", b"b"], [Evil()]), protocol=2))
    out_json = tmp_path / "m.json"
    rc, _, err = run(capsys, "eval", files / "dcq.pt", "--bin", bad, "--json", out_json)
    assert rc == 2
    line = one_line_error(err)
    assert line.startswith("dcq eval: error:") and "refused" in line and "system" in line
    assert not marker.exists() and not out_json.exists()


def test_non_dcq_checkpoints_give_one_line_and_exit_2(files, capsys, tmp_path):
    plain = tmp_path / "resnet.pt"
    torch.save({"state_dict": net(0).state_dict()}, plain)
    rc, _, err = run(capsys, "eval", plain, "--bin", files / "tiny.bin")
    assert rc == 2 and "not a dcq checkpoint" in one_line_error(err)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a torch file" * 10)
    rc, _, err = run(capsys, "eval", garbage, "--bin", files / "tiny.bin")
    assert rc == 2 and str(garbage) in one_line_error(err)
    rc, _, err = run(capsys, "eval", tmp_path / "missing.pt", "--bin", files / "tiny.bin")
    assert rc == 2 and "does not exist" in one_line_error(err)
    # and through the real entry point, in a fresh process
    proc = subprocess.run([sys.executable, "-m", "dcq", "eval", str(plain), "--bin", str(files / "tiny.bin")],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "not a dcq checkpoint" in one_line_error(proc.stderr)


def test_eval_usage_errors(files, capsys, tmp_path):
    rc, _, err = run(capsys, "eval", files / "dcq.pt")
    assert rc == 2 and "nothing to evaluate" in one_line_error(err)
    rc, _, err = run(capsys, "eval", files / "dcq.pt", "--bin", tmp_path / "nope.bin")
    assert rc == 2 and "nope.bin" in one_line_error(err)
    rc, _, err = run(capsys, "eval", files / "dcq.pt", "--bin", files / "tiny.bin", tmp_path / "tiny.bin")
    assert rc == 2 and "both named 'tiny'" in one_line_error(err)


def test_eval_dataset_longtail_goes_to_its_own_file(files, capsys, tmp_path):
    from dcq.data.synth.dataset import synthesize

    ds = tmp_path / "ds"
    synthesize(ds, profile="mf2", identities=24, image_size=SIZE, val_pairs=20, val_identities=10, progress=False)
    rc, out, _ = run(capsys, "embed", files / "dcq.pt", files / "imgs", "--out", tmp_path / "dis.npy")
    assert rc == 0
    out_json = tmp_path / "m.json"
    rc, out, _ = run(capsys, "eval", files / "dcq.pt", "--bin", ds / "val.bin", "--dataset", ds,
                     "--distractors", tmp_path / "dis.npy", "--json", out_json, "--plots", tmp_path / "p")
    assert rc == 0
    data = json.loads(out_json.read_text())
    assert list(data) == ["val"] and set(data["val"]) == VERIFY_KEYS
    extra = json.loads((tmp_path / "m.longtail.json").read_text())
    rows = extra["longtail"]["rows"]
    assert rows[-1]["bucket"] == "all" and rows[-1]["probes"] == 24
    assert extra["identification"]["distractors"] == 5 and extra["identification"]["probes"] == 24
    assert "| training images / identity |" in out and "rank-1" in out
    assert (tmp_path / "p" / "longtail.png").is_file()


def test_onnx_model_goes_through_the_same_pipeline_as_its_checkpoint(files, capsys, tmp_path):
    """`dcq eval MODEL.onnx --dataset DIR` works, and gives the checkpoint's numbers (one code path)."""
    pytest.importorskip("onnxruntime")
    from dcq.data.synth import synthesize

    ds = tmp_path / "ds"
    synthesize(ds, profile="mf2", identities=16, image_size=SIZE, val_pairs=20, val_identities=10, progress=False)
    onnx_path = tmp_path / "m.onnx"
    assert run(capsys, "export", files / "dcq.pt", "--onnx", onnx_path)[0] == 0
    rc, _, _ = run(capsys, "embed", "--onnx", onnx_path, files / "imgs", "--out", tmp_path / "dis")
    assert rc == 0
    results = {}
    for name, model in (("pt", files / "dcq.pt"), ("onnx", onnx_path)):
        rc, out, err = run(capsys, "eval", model, "--bin", ds / "val.bin", "--dataset", ds, "--distractors",
                           tmp_path / "dis", "--json", tmp_path / f"{name}.json", "--batch-size", 5)
        assert rc == 0, err
        results[name] = (json.loads((tmp_path / f"{name}.json").read_text()),
                         json.loads((tmp_path / f"{name}.longtail.json").read_text()))
    assert "ONNX" in out and "| training images / identity |" in out
    (pt, pt_lt), (ox, ox_lt) = results["pt"], results["onnx"]
    assert pt["val"]["accuracy"] == pytest.approx(ox["val"]["accuracy"], abs=1 / 20)
    for a, b in zip(pt_lt["longtail"]["rows"], ox_lt["longtail"]["rows"]):
        assert (a["bucket"], a["probes"]) == (b["bucket"], b["probes"])
        assert a["rank1"] == pytest.approx(b["rank1"], abs=1 / max(1, a["probes"]))
    assert pt_lt["identification"]["distractors"] == ox_lt["identification"]["distractors"] == 5


def test_embed_writes_npy_and_names(files, capsys, tmp_path):
    out = tmp_path / "e" / "emb.npy"
    extra = files / "imgs" / "0.png"
    rc, _, _ = run(capsys, "embed", files / "dcq.pt", files / "imgs", extra, "--out", out, "--batch-size", 2)
    assert rc == 0
    emb = np.load(out)
    names = (tmp_path / "e" / "emb.txt").read_text().splitlines()
    assert emb.shape == (6, DIM) and emb.dtype == np.float32 and len(names) == 6
    assert names[0].endswith("imgs/0.png") and names[-1] == str(extra)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    encoder, _ = build_eval_encoder(load_checkpoint(files / "dcq.pt"))
    images = np.stack([np.array(Image.open(p).convert("RGB")) for p in names])
    np.testing.assert_allclose(emb, embed_images(encoder, images), atol=1e-5)
    fe = net(1)
    assert not np.allclose(emb, embed_images(fe, images), atol=1e-3)  # not the feature extractor
    assert sorted(os.listdir(tmp_path / "e")) == ["emb.npy", "emb.txt"]
    rc, _, err = run(capsys, "embed", files / "dcq.pt", files / "imgs", "--out", tmp_path / "x.bin")
    assert rc == 2 and ".npy" in one_line_error(err)
    rc, _, err = run(capsys, "embed", files / "dcq.pt", tmp_path / "none", "--out", out)
    assert rc == 2 and "none" in one_line_error(err)


def test_verify_uses_checkpoint_threshold(files, capsys, tmp_path):
    a, b = files / "imgs" / "0.png", files / "imgs" / "sub" / "1.png"
    rc, out, _ = run(capsys, "verify", files / "dcq.pt", a, a)
    assert rc == 0 and "cosine similarity: 1.0000" in out and "same (threshold 0.2500" in out
    rc, out, _ = run(capsys, "verify", files / "dcq.pt", a, b, "--threshold", "1.01")
    assert rc == 0 and "different (threshold 1.0100" in out
    rc, _, err = run(capsys, "verify", files / "fc.pt", a, b)
    assert rc == 2 and "--threshold" in one_line_error(err)
    rc, _, err = run(capsys, "verify", files / "dcq.pt", a, Path(tmp_path) / "nope.jpg")
    assert rc == 2 and "nope.jpg" in one_line_error(err)


# --------------------------------------------------------------------------- embedding helpers
def test_embed_images_flip_test_and_input_kinds():
    from dcq.data.transforms import to_tensor
    from dcq.eval import raw_pixel_embeddings

    rng = np.random.default_rng(3)
    encoder = net(5)
    encoder.train()
    arr = rng.integers(0, 256, size=(5, SIZE, SIZE, 3), dtype=np.uint8)
    got = embed_images(encoder, arr, batch_size=2)
    assert encoder.training  # mode restored
    assert got.dtype == np.float32 and got.shape == (5, DIM)
    encoder.eval()
    with torch.no_grad():
        x = to_tensor(arr)
        want = torch.nn.functional.normalize(encoder(x) + encoder(torch.flip(x, dims=[3])), dim=1).numpy()
        plain = torch.nn.functional.normalize(encoder(x), dim=1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(embed_images(encoder, arr, flip=False), plain, atol=1e-5)
    # a mirrored image has the same flip-test embedding
    np.testing.assert_allclose(embed_images(encoder, arr[:, :, ::-1].copy()), got, atol=1e-5)
    # encoded bytes, float tensors and larger arrays (resized to the encoder's size) all work
    encoded = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        encoded.append(buf.getvalue())
    np.testing.assert_allclose(embed_images(encoder, encoded, batch_size=3), got, atol=1e-5)
    np.testing.assert_allclose(embed_images(encoder, to_tensor(arr)), got, atol=1e-5)
    big = np.repeat(np.repeat(arr, 2, axis=1), 2, axis=2)  # 32 px; box-downsampling gives arr back
    np.testing.assert_allclose(embed_images(encoder, big), got, atol=1e-5)
    raw = raw_pixel_embeddings(arr)
    assert raw.shape == (5, SIZE * SIZE * 3) and np.allclose(np.linalg.norm(raw, axis=1), 1, atol=1e-5)
    with pytest.raises(DcqError, match="no images"):
        embed_images(encoder, [])
    with pytest.raises(DcqError, match="cannot decode"):
        embed_images(encoder, [b"not an image"])
