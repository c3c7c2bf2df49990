"""`dcq embed --onnx` and OnnxEmbedder: equal to `dcq embed CKPT`, no torch, preprocessing computed
by hand on a hand-built graph, export metadata, resumable shards, undecodable files listed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from dcq.checkpoint import save_checkpoint
from dcq.cli import main
from dcq.deploy import embed_job
from dcq.deploy.embed_job import embed_collection, read_embeddings
from dcq.deploy.onnx_model import OnnxEmbedder
from dcq.errors import DcqError
from dcq.models import get_backbone

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A cpunet checkpoint (32 px, 16-d) and its `dcq export`."""
    root = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    net = get_backbone("cpunet", embedding_size=16, image_size=32).eval()
    ckpt = save_checkpoint(root / "final.pt", {
        "model": {"backbone": "cpunet", "embedding_size": 16, "image_size": 32},
        "feature_extractor": net.state_dict(), "weight_generator": net.state_dict()})
    assert main(["export", str(ckpt), "--onnx", str(root / "m.onnx")]) == 0
    return ckpt, root / "m.onnx"


@pytest.fixture
def crops(tmp_path, rng):
    folder = tmp_path / "crops"
    (folder / "p").mkdir(parents=True)
    for i in range(9):  # 40 px JPEG and PNG files: resized to 32 px by both paths
        img = (rng.random((40, 40, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(folder / "p" / f"{i}.{'jpg' if i % 2 else 'png'}")
    return folder


def test_export_writes_the_preprocessing_metadata(exported):
    meta = {p.key: p.value for p in onnx.load(str(exported[1])).metadata_props}
    assert meta["dcq.image_size"] == "32" and meta["dcq.embedding_size"] == "16"
    assert meta["dcq.color_order"] == "RGB" and meta["dcq.mean"] == "127.5,127.5,127.5"
    assert meta["dcq.std"] == "127.5,127.5,127.5" and meta["dcq.encoder"] == "weight_generator"
    assert meta["dcq.flip_test"] == "true" and meta["dcq.version"]
    e = OnnxEmbedder(exported[1])
    assert (e.image_size, e.embedding_size) == (32, 16)


def test_onnx_embed_equals_checkpoint_embed(exported, crops, tmp_path, capsys):
    ckpt, model = exported
    assert main(["embed", str(ckpt), str(crops), "--out", str(tmp_path / "ckpt.npy")]) == 0
    assert main(["embed", "--onnx", str(model), str(crops), "--out", str(tmp_path / "onnx"), "--batch-size", "4",
                 "--shard-size", "5", "--threads", "1"]) == 0
    expected = np.load(tmp_path / "ckpt.npy")
    names = (tmp_path / "ckpt.txt").read_text().splitlines()
    got, paths, manifest = read_embeddings(tmp_path / "onnx")
    assert paths == names and len(manifest["shards"]) == 2 and got.dtype == np.float32
    cosine = np.sum(got.astype(np.float64) * expected, axis=1)
    assert cosine.min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


def test_onnx_embed_path_does_not_import_torch(exported, crops, tmp_path):
    code = ("import sys; from dcq.cli import main; "
            f"rc = main(['embed', '--onnx', {str(exported[1])!r}, {str(crops)!r}, '--out', {str(tmp_path / 'e')!r}]);"
            "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch was imported'")
    env = {**os.environ, "PYTHONPATH": SRC}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True)
    assert (tmp_path / "e" / "manifest.json").is_file()


def _linear_model(path, size, dim, rng, meta=None, batch="N"):
    """A graph computing flatten(x) @ W for NCHW input: the embedding is computable by hand."""
    w = rng.standard_normal((3 * size * size, dim)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["images"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["emb"])],
        "linear", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, [batch, dim])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    for k, v in (meta or {}).items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return w


def _by_hand(images, w, mean, std, bgr=False, flip=True):
    x = images.astype(np.float64)
    if bgr:
        x = x[..., ::-1]
    x = (x - np.array(mean)) / np.array(std)
    x = x.transpose(0, 3, 1, 2)
    e = x.reshape(len(x), -1) @ w
    if flip:
        e = e + x[..., ::-1].reshape(len(x), -1) @ w
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def test_insightface_convention_without_metadata(tmp_path, rng):
    w = _linear_model(tmp_path / "plain.onnx", 12, 5, rng)
    e = OnnxEmbedder(tmp_path / "plain.onnx")
    assert (e.image_size, e.embedding_size) == (12, 5)  # the graph's static input size
    images = (rng.random((3, 12, 12, 3)) * 255).astype(np.uint8)
    np.testing.assert_allclose(e.embed(images), _by_hand(images, w, 127.5, 127.5), atol=1e-5)
    np.testing.assert_allclose(e.embed(images, flip=False), _by_hand(images, w, 127.5, 127.5, flip=False),
                               atol=1e-5)


def test_metadata_preprocessing_bgr_mean_std_and_a_fixed_batch(tmp_path, rng):
    meta = {"dcq.image_size": "8", "dcq.color_order": "BGR", "dcq.mean": "10,20,30", "dcq.std": "50,60,70"}
    w = _linear_model(tmp_path / "bgr.onnx", 8, 4, rng, meta, batch=2)
    e = OnnxEmbedder(tmp_path / "bgr.onnx")
    images = (rng.random((3, 8, 8, 3)) * 255).astype(np.uint8)  # 3 images through a batch-2 graph
    expected = _by_hand(images, w, [10, 20, 30], [50, 60, 70], bgr=True)
    np.testing.assert_allclose(e.embed(images), expected, atol=1e-5)
    with pytest.raises(DcqError, match="aligned crops"):
        e.embed(images[:, :4, :4])
    _linear_model(tmp_path / "badmeta.onnx", 8, 4, rng, {"dcq.image_size": "8", "dcq.mean": "1,2"})
    with pytest.raises(DcqError, match="dcq.mean"):
        OnnxEmbedder(tmp_path / "badmeta.onnx")


def test_resume_of_a_stopped_run_gives_the_same_shards(exported, crops, tmp_path, monkeypatch):
    files = sorted(p for p in (crops / "p").iterdir())
    (crops / "p" / "zz_broken.jpg").write_bytes(b"\xff\xd8 truncated")
    files.append(crops / "p" / "zz_broken.jpg")
    embedder = OnnxEmbedder(exported[1], threads=1)
    whole = embed_collection(embedder, files, tmp_path / "whole", batch_size=2, shard_size=3)
    calls = {"n": 0}
    real = OnnxEmbedder.embed

    def stop_on_fifth_batch(self, images, flip=True):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, images, flip)

    monkeypatch.setattr(OnnxEmbedder, "embed", stop_on_fifth_batch)
    with pytest.raises(KeyboardInterrupt):
        embed_collection(embedder, files, tmp_path / "stopped", batch_size=2, shard_size=3)
    assert len(json.loads((tmp_path / "stopped" / "manifest.json").read_text())["shards"]) == 2
    monkeypatch.setattr(OnnxEmbedder, "embed", real)
    resumed = embed_collection(embedder, files, tmp_path / "stopped", batch_size=2, shard_size=3)
    assert resumed == whole
    for shard in whole["shards"]:
        for key in ("file", "paths"):
            assert (tmp_path / "whole" / shard[key]).read_bytes() == (tmp_path / "stopped" / shard[key]).read_bytes()
    assert [f["path"] for f in whole["failed"]] == [str(crops / "p" / "zz_broken.jpg")]
    again = embed_collection(embedder, files, tmp_path / "stopped", batch_size=2, shard_size=3)
    assert again == whole  # nothing left to do: nothing changes


def test_resume_refuses_another_model_and_a_foreign_folder(exported, crops, tmp_path, rng, capsys):
    model = exported[1]
    out = tmp_path / "e"
    assert main(["embed", "--onnx", str(model), str(crops), "--out", str(out)]) == 0
    _linear_model(tmp_path / "other.onnx", 32, 16, rng)
    assert main(["embed", "--onnx", str(tmp_path / "other.onnx"), str(crops), "--out", str(out)]) == 2
    assert main(["embed", "--onnx", str(model), str(crops), "--out", str(out), "--no-flip"]) == 2
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("mine")
    assert main(["embed", "--onnx", str(model), str(crops), "--out", str(tmp_path / "busy")]) == 2
    assert main(["embed", "--onnx", str(model), str(crops), "--out", str(tmp_path / "e.npy")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dcq embed: error:")]
    assert len(err) == 4 and "fingerprint" in err[0] and "flip" in err[1] and "other files" in err[2]
    assert "folder" in err[3]
    assert embed_job.read_manifest(out)["rows"] == 9


def test_landmarked_photos_embed_as_their_aligned_crops(exported, tmp_path, rng):
    from dcq.align import align_face, reference_points

    photos = tmp_path / "photos"
    photos.mkdir()
    lines = []
    for i in range(3):
        Image.fromarray((rng.random((70, 60, 3)) * 255).astype(np.uint8)).save(photos / f"{i}.png")
        pts = reference_points(32) * 1.5 + rng.uniform(0, 6, (5, 2))
        lines.append(f"{i}.png " + " ".join(f"{v:.4f}" for v in pts.ravel()))
    (tmp_path / "lm.txt").write_text("\n".join(lines) + "\n")
    assert main(["embed", "--onnx", str(exported[1]), str(photos), "--landmarks", str(tmp_path / "lm.txt"),
                 "--out", str(tmp_path / "e")]) == 0
    got, paths, manifest = read_embeddings(tmp_path / "e")
    assert manifest["landmarks"] == str(tmp_path / "lm.txt")
    e = OnnxEmbedder(exported[1])
    from dcq.align import read_landmarks

    lm = read_landmarks(tmp_path / "lm.txt")
    crops = np.stack([align_face(Image.open(p), lm[Path(p).name][0], 32) for p in paths])
    np.testing.assert_allclose(got, e.embed(crops), atol=1e-6)


def test_readme_enrol_and_search_in_three_commands(exported, crops, tmp_path):
    model, enrol = str(exported[1]), str(crops)
    emb, gallery, hits = str(tmp_path / "enrol_emb"), str(tmp_path / "people.gallery"), tmp_path / "hits.json"
    query = str(crops / "p" / "3.jpg")
    assert main(["embed", "--onnx", model, enrol, "--out", emb]) == 0
    assert main(["gallery", "build", emb, "--out", gallery]) == 0
    assert main(["gallery", "search", gallery, "--onnx", model, query, "-k", "10", "--json", str(hits)]) == 0
    result = json.loads(hits.read_text())
    assert set(result) == {"ids", "scores", "labels", "queries"} and len(result["ids"][0]) == 9
    assert result["labels"][0][0] == query and result["scores"][0][0] == pytest.approx(1, abs=1e-5)
    assert result["scores"][0] == sorted(result["scores"][0], reverse=True)
