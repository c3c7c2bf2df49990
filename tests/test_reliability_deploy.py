"""Hostile use of the deploy commands (issue 32): concurrent writers, file names that break lines,
edited manifests, damaged galleries, other preprocessing, hostile ONNX external data, absurd
landmarks. Each case ends in the right result or in exit 2 with one short line naming the fix."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from dcq.cli import main
from dcq.deploy.embed_job import read_embeddings
from dcq.deploy.gallery import Gallery
from dcq.deploy.gallery_store import read_store, write_store
from dcq.errors import DcqError

SRC = str(Path(__file__).resolve().parents[1] / "src")
SIZE, DIM = 8, 4


def linear_model(path, rng, meta=None):
    """NCHW (N, 3, 8, 8) -> flatten @ W (N, 4): a tiny model onnxruntime runs at once."""
    w = rng.standard_normal((3 * SIZE * SIZE, DIM)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["images"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["emb"])],
        "linear", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["N", DIM])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    for k, v in (meta or {"dcq.image_size": str(SIZE)}).items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return model


def one_error(capsys, rc, needle):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and len(err.encode()) <= 2048 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    return lines[0]


def images(folder: Path, names, rng):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = os.path.join(os.fsencode(folder), name if isinstance(name, bytes) else os.fsencode(name))
        Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)).save(path, format="PNG")
    return folder


@pytest.fixture
def model(tmp_path, rng):
    linear_model(tmp_path / "m.onnx", rng)
    return tmp_path / "m.onnx"


def hold(args: str):
    """A process that holds a lock (python code ``args``) until its stdin closes."""
    code = f"import sys; {args}; print('held', flush=True); sys.stdin.read()"
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         env={**os.environ, "PYTHONPATH": SRC}, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


# ------------------------------------------------------------------ 1. lost updates
def test_gallery_add_is_locked_so_no_batch_is_lost(tmp_path, rng, capsys):
    x = rng.standard_normal((6, DIM)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    g = tmp_path / "people.gallery"
    assert main(["gallery", "build", str(tmp_path / "x.npy"), "--out", str(g)]) == 0
    holder = hold(f"from dcq.deploy.gallery_cli import lock_gallery; from pathlib import Path; "
                  f"lock = lock_gallery(Path({str(g)!r}))")
    try:
        capsys.readouterr()
        rc = main(["gallery", "add", str(g), str(tmp_path / "x.npy")])
        one_error(capsys, rc, f"pid {holder.pid}")
        assert Gallery.load(g).count == 6  # nothing written by the refused add
    finally:
        holder.communicate("")
    # racing adds: every add that says it succeeded is in the file, none is lost
    procs = [subprocess.Popen([sys.executable, "-m", "dcq", "gallery", "add", str(g), str(tmp_path / "x.npy")],
                              env={**os.environ, "PYTHONPATH": SRC}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    assert all(rc == 0 or (rc == 2 and "in use by" in err) for rc, err in results), results
    assert Gallery.load(g).count == 6 * (1 + sum(rc == 0 for rc, _ in results))


def test_embed_folder_is_locked_and_a_resume_checks_its_shards(model, tmp_path, rng, capsys):
    crops = images(tmp_path / "crops", [f"{i}.png" for i in range(6)], rng)
    out = tmp_path / "emb"
    out.mkdir()
    holder = hold(f"from dcq.deploy.embed_job import lock_folder; from pathlib import Path; "
                  f"lock = lock_folder(Path({str(out)!r}))")
    try:
        capsys.readouterr()
        rc = main(["embed", "--onnx", str(model), str(crops), "--out", str(out)])
        one_error(capsys, rc, "in use by another dcq embed")
    finally:
        holder.communicate("")
    assert main(["embed", "--onnx", str(model), str(crops), "--out", str(out), "--shard-size", "2"]) == 0
    # another process rewrote a shard with fewer rows: the resume and the reader both notice
    shard = out / "shard_00001.npy"
    np.save(shard, np.load(shard)[:1])
    images(crops, ["new.png"], rng)
    capsys.readouterr()
    rc = main(["embed", "--onnx", str(model), str(crops), "--out", str(out), "--shard-size", "2"])
    one_error(capsys, rc, "shard_00001.npy")
    with pytest.raises(DcqError, match="checksum"):
        read_embeddings(out)


# ------------------------------------------------------------------ 2. file names
HOSTILE = ["new\nline.png", "carriage\rreturn.png", "sep\u2028arator.png", "nel\x85.png", "feed\x0c.png",
           b"latin1-\xe9\xff.png", "plain.png"]


def test_any_file_name_round_trips_through_embed_and_gallery(model, tmp_path, rng, capsys):
    crops = images(tmp_path / "crops", HOSTILE, rng)
    expected = sorted(os.path.join(str(crops), os.fsdecode(os.fsencode(n) if isinstance(n, str) else n))
                      for n in HOSTILE)
    out = tmp_path / "emb"
    assert main(["embed", "--onnx", str(model), str(crops), "--out", str(out), "--shard-size", "3"]) == 0
    emb, paths, manifest = read_embeddings(out)
    assert sorted(paths) == expected and len(emb) == len(HOSTILE) == manifest["rows"]
    assert main(["embed", "--onnx", str(model), str(crops), "--out", str(out), "--shard-size", "3"]) == 0
    assert read_embeddings(out)[2]["rows"] == len(HOSTILE)  # the re-run found every name: no duplicates
    assert main(["gallery", "build", str(out), "--out", str(tmp_path / "g")]) == 0
    assert sorted(Gallery.load(tmp_path / "g").labels) == expected
    capsys.readouterr()
    assert main(["gallery", "search", str(tmp_path / "g"), "--onnx", str(model), str(crops), "-k", "1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(HOSTILE)  # one line per query, whatever its name


def test_align_lists_failures_one_per_line_whatever_their_names(tmp_path, rng):
    photos = images(tmp_path / "photos", [b"bad-\xff\nname.png", "ok.png"], rng)
    (tmp_path / "lm.txt").write_text("ok.png 2 3 6 3 4 4 3 6 5 6\n")
    assert main(["align", str(photos), "--landmarks", str(tmp_path / "lm.txt"), "--out", str(tmp_path / "out"),
                 "--size", "8"]) == 0
    lines = (tmp_path / "out" / "failed.txt").read_text().splitlines()
    assert len(lines) == 1 and "\\xff\\n" in lines[0] and "no landmarks" in lines[0]


# ------------------------------------------------------------------ 3. path traversal
@pytest.mark.parametrize("key,value", [("paths", "../outside.txt"), ("file", "OUTSIDE"), ("paths", "/etc/passwd")])
def test_manifest_paths_are_confined_to_the_folder(model, tmp_path, rng, capsys, key, value):
    crops = images(tmp_path / "crops", ["a.png", "b.png"], rng)
    out = tmp_path / "emb"
    assert main(["embed", "--onnx", str(model), str(crops), "--out", str(out)]) == 0
    (tmp_path / "outside.txt").write_text("secret 1\nsecret 2\n")  # as many lines as the shard has rows
    np.save(tmp_path / "outside.npy", np.eye(2, DIM, dtype=np.float32))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0][key] = str(tmp_path / "outside.npy") if value == "OUTSIDE" else value
    (out / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    rc = main(["gallery", "build", str(out), "--out", str(tmp_path / "g")])
    one_error(capsys, rc, "which is not a file in")
    assert not (tmp_path / "g").exists()


# ------------------------------------------------------------------ 4. gallery integrity
def test_every_flipped_bit_of_a_gallery_is_reported(tmp_path, rng, capsys):
    x = rng.standard_normal((20, DIM)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "l.txt").write_text("".join(f"p{i}\n" for i in range(20)))
    g = tmp_path / "g"
    assert main(["gallery", "build", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "l.txt"),
                 "--out", str(g)]) == 0
    good = g.read_bytes()
    positions = list(range(8, 16)) + sorted(rng.choice(np.arange(16, len(good)), 40, replace=False).tolist())
    for pos in positions:
        bad = bytearray(good)
        bad[pos] ^= 1 << int(rng.integers(8))
        g.write_bytes(bytes(bad))
        capsys.readouterr()
        rc = main(["gallery", "search", str(g), str(tmp_path / "x.npy"), "-k", "1"])
        one_error(capsys, rc, str(g))


def test_a_header_that_disagrees_with_its_arrays_is_refused(tmp_path, rng):
    x = rng.standard_normal((5, DIM)).astype(np.float32)
    Gallery.build(x).save(tmp_path / "g")
    header, arrays = read_store(tmp_path / "g")
    for forged in ({**header, "count": 6}, {**header, "embedding_size": 3}, {**header, "count": "5"}):
        write_store(tmp_path / "f", forged, {"vectors": np.asarray(arrays["vectors"])})  # a valid checksum
        with pytest.raises(DcqError, match="damaged"):
            Gallery.load(tmp_path / "f")
    write_store(tmp_path / "f", header, {"vectors": np.asarray(arrays["vectors"]).astype(np.float64)})
    with pytest.raises(DcqError, match="damaged"):
        Gallery.load(tmp_path / "f")


# ------------------------------------------------------------------ 6. preprocessing and flip
def test_gallery_refuses_other_preprocessing_and_flip(model, tmp_path, rng, capsys):
    crops = images(tmp_path / "crops", ["a.png", "b.png", "c.png"], rng)
    assert main(["embed", "--onnx", str(model), str(crops), "--out", str(tmp_path / "emb")]) == 0
    g = str(tmp_path / "g")
    assert main(["gallery", "build", str(tmp_path / "emb"), "--out", g]) == 0
    retagged = onnx.load(str(model))  # same graph, so the same fingerprint; other colour order and mean
    del retagged.metadata_props[:]
    for k, v in {"dcq.image_size": str(SIZE), "dcq.color_order": "BGR", "dcq.mean": "0,0,0"}.items():
        retagged.metadata_props.add(key=k, value=v)
    onnx.save(retagged, str(tmp_path / "bgr.onnx"))
    capsys.readouterr()
    rc = main(["gallery", "search", g, "--onnx", str(tmp_path / "bgr.onnx"), str(crops)])
    one_error(capsys, rc, "preprocessing")
    rc = main(["gallery", "search", g, "--onnx", str(model), "--no-flip", str(crops)])
    one_error(capsys, rc, "flip test")
    assert main(["embed", "--onnx", str(tmp_path / "bgr.onnx"), str(crops), "--out", str(tmp_path / "e2")]) == 0
    capsys.readouterr()
    rc = main(["gallery", "add", g, str(tmp_path / "e2")])
    one_error(capsys, rc, "preprocessing")
    rc = main(["embed", "--onnx", str(tmp_path / "bgr.onnx"), str(crops), "--out", str(tmp_path / "emb")])
    one_error(capsys, rc, "preprocessing")
    assert main(["gallery", "search", g, "--onnx", str(model), str(crops)]) == 0  # the same model: fine


# ------------------------------------------------------------------ 8. hostile ONNX external data
def _external_model(tmp_path, rng, declared_elements):
    """The linear model with W in w.bin; the graph claims W has ``declared_elements`` floats."""
    model = linear_model(tmp_path / "inline.onnx", rng)
    w = numpy_helper.to_array(model.graph.initializer[0])
    (tmp_path / "w.bin").write_bytes(w.tobytes())
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.dims[:]
    tensor.dims.extend([declared_elements // DIM, DIM])
    for k, v in {"location": "w.bin", "offset": "0", "length": str(4 * declared_elements)}.items():
        tensor.external_data.add(key=k, value=v)
    onnx.save(model, str(tmp_path / "ext.onnx"))
    return tmp_path / "ext.onnx"


# The child's own peak resident set in KiB. Not getrusage's ru_maxrss: Linux keeps that across execve,
# so a child of a pytest process that has grown to 1.4 GB reports at least 1.4 GB.
PEAK_KB = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])"


def test_external_data_declaring_8_gb_is_refused_before_loading(tmp_path, rng, capsys):
    path = _external_model(tmp_path, rng, 2 * 2**30)  # 2^31 floats: 8 GB declared, 3 KB on disk
    np.save(tmp_path / "x.npy", rng.standard_normal((4, DIM)).astype(np.float32))
    code = ("import resource, sys; from dcq.cli import main; "
            f"rc = main(['gallery', 'build', {str(tmp_path / 'x.npy')!r}, '--model', {str(path)!r}, '--out', "
            f"{str(tmp_path / 'g')!r}]); "
            f"print(rc, {PEAK_KB})")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC},
                          capture_output=True, text=True, timeout=120)
    rc, rss_kb = map(int, done.stdout.split())
    assert rc == 2 and rss_kb < 1 << 20, done
    assert len(done.stderr.strip().splitlines()) == 1 and "w.bin" in done.stderr, done.stderr
    capsys.readouterr()
    one_error(capsys, main(["embed", "--onnx", str(path), str(tmp_path / "x.npy"), "--out", str(tmp_path / "e")]),
              "w.bin")


def test_fingerprint_streams_the_file_and_keeps_its_value(tmp_path, rng):
    import hashlib

    from dcq.deploy.metadata import model_fingerprint
    from dcq.deploy.onnx_model import OnnxEmbedder

    linear_model(tmp_path / "m.onnx", rng)
    old = hashlib.sha256(onnx.load(str(tmp_path / "m.onnx")).graph.SerializeToString()).hexdigest()[:16]
    assert model_fingerprint(tmp_path / "m.onnx") == old  # galleries made before keep matching
    real = _external_model(tmp_path, rng, 3 * SIZE * SIZE * DIM)  # honest external data
    e = OnnxEmbedder(real)
    assert e.fingerprint == model_fingerprint(real) != model_fingerprint(tmp_path / "inline.onnx")
    (tmp_path / "w.bin").write_bytes((tmp_path / "w.bin").read_bytes()[:-4])
    with pytest.raises(DcqError, match="w.bin"):
        OnnxEmbedder(real)


# ------------------------------------------------------------------ 9. absurd landmarks
def test_a_landmark_of_1e300_fails_its_file_only(model, tmp_path, rng, capsys):
    photos = images(tmp_path / "photos", ["a.png", "b.png"], rng)
    (tmp_path / "lm.txt").write_text("a.png 2 3 6 3 4 4 3 6 5 6\nb.png 1e300 3 6 3 4 4 3 6 5 6\n")
    assert main(["align", str(photos), "--landmarks", str(tmp_path / "lm.txt"), "--out", str(tmp_path / "out"),
                 "--size", "8"]) == 0
    assert "b.png" in (tmp_path / "out" / "failed.txt").read_text()
    assert main(["embed", "--onnx", str(model), str(photos), "--landmarks", str(tmp_path / "lm.txt"),
                 "--out", str(tmp_path / "emb")]) == 0
    emb, paths, manifest = read_embeddings(tmp_path / "emb")
    assert [Path(p).name for p in paths] == ["a.png"]
    assert [Path(f["path"]).name for f in manifest["failed"]] == ["b.png"]
    assert "outside any photo" in manifest["failed"][0]["reason"]


# ------------------------------------------------------------------ 10. leftovers of a killed add
def test_temporaries_of_a_killed_add_are_removed(tmp_path, rng):
    np.save(tmp_path / "x.npy", rng.standard_normal((3, DIM)).astype(np.float32))
    g = tmp_path / "g"
    assert main(["gallery", "build", str(tmp_path / "x.npy"), "--out", str(g)]) == 0
    left = tmp_path / ".g.k2j3h4.tmp"  # what dcq.atomic leaves when kill -9 hits it mid-write
    left.write_bytes(b"\0" * 1000)
    other = tmp_path / ".other.abc.tmp"
    other.write_bytes(b"")
    time.sleep(0.01)
    assert main(["gallery", "add", str(g), str(tmp_path / "x.npy")]) == 0
    assert not left.exists() and other.exists()  # only this gallery's temporaries
