"""The gallery: exact search against a brute-force sort, faiss flat equal to it, IVF/HNSW recall,
the file (atomic, fingerprinted, truncation detected), additions, and the command line."""

import json
import subprocess
import sys

import numpy as np
import pytest

from dcq.cli import main
from dcq.deploy import gallery as gallery_module
from dcq.deploy.gallery import Gallery, exact_search
from dcq.deploy.gallery_store import read_store, write_store
from dcq.errors import DcqError


def brute_force(q, x, k):
    """Top k by a full sort of every cosine, in float64."""
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = qn.astype(np.float64) @ xn.astype(np.float64).T
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(s, ids, 1)


def clustered(rng, people=300, per=4, d=32, noise=0.6):
    centres = rng.standard_normal((people, d))
    x = np.repeat(centres, per, axis=0) + noise * rng.standard_normal((people * per, d))
    q = centres[rng.integers(0, people, 40)] + noise * rng.standard_normal((40, d))
    return x.astype(np.float32), q.astype(np.float32)


def test_exact_search_equals_a_full_sort(rng):
    x = rng.standard_normal((5000, 24)).astype(np.float32) * 3  # not unit rows: the gallery normalises
    q = rng.standard_normal((30, 24)).astype(np.float32)
    g = Gallery.build(x)
    ids, scores = g.search(q, 10, engine="numpy")
    ref_ids, ref_scores = brute_force(q, x, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    small_ids, _ = exact_search(q / np.linalg.norm(q, axis=1, keepdims=True),
                                x / np.linalg.norm(x, axis=1, keepdims=True), 10, block=7)
    np.testing.assert_array_equal(small_ids, ref_ids)  # the blocked merge, blocks of 7 rows


def test_faiss_flat_top10_equals_exact_search(rng):
    pytest.importorskip("faiss")
    x, q = clustered(rng)
    g = Gallery.build(x)
    faiss_ids, faiss_scores = g.search(q, 10, engine="faiss")
    ref_ids, ref_scores = brute_force(q, x, 10)
    np.testing.assert_array_equal(faiss_ids, ref_ids)
    np.testing.assert_allclose(faiss_scores, ref_scores, atol=1e-5)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_find_the_exact_neighbours(rng, kind, tmp_path):
    pytest.importorskip("faiss")
    x, q = clustered(rng)
    g = Gallery.build(x, kind=kind, nlist=16, nprobe=8, ef_search=64)
    g.save(tmp_path / "g")
    ids, _ = Gallery.load(tmp_path / "g").search(q, 10)
    ref, _ = brute_force(q, x, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), ref.tolist())])
    assert recall >= 0.9
    one, _ = g.search(q, 10, nprobe=1, ef_search=10)  # narrower searches are allowed
    assert one.shape == (40, 10)


def test_file_round_trip_labels_and_additions(rng, tmp_path):
    x, q = clustered(rng, people=50)
    g = Gallery.build(x[:150], labels=[f"a{i}" for i in range(150)], fingerprint="f1")
    g.save(tmp_path / "g")
    g2 = Gallery.load(tmp_path / "g")
    assert (g2.count, g2.embedding_size, g2.fingerprint) == (150, 32, "f1")
    g2.add(x[150:], [f"b{i}" for i in range(50)], fingerprint="f1")
    g2.save(tmp_path / "g")
    g3 = Gallery.load(tmp_path / "g")
    assert g3.count == 200 and g3.labels[150] == "b0" and g3.labels[0] == "a0"
    np.testing.assert_array_equal(g3.search(q, 5, fingerprint="f1", engine="numpy")[0], brute_force(q, x, 5)[0])
    with pytest.raises(DcqError, match="labels"):
        g3.add(x[:3], None, fingerprint="f1")


def test_queries_from_another_model_are_refused(rng):
    x, q = clustered(rng, people=20)
    g = Gallery.build(x, fingerprint="aaaa")
    with pytest.raises(DcqError, match="from model bbbb"):
        g.search(q, 3, fingerprint="bbbb")
    with pytest.raises(DcqError, match="no model fingerprint"):
        g.search(q, 3)
    with pytest.raises(DcqError, match="16-d"):
        g.search(q[:, :16], 3, fingerprint="aaaa")
    bad = q.copy()
    bad[2] = np.nan
    with pytest.raises(DcqError, match="row 2"):
        g.search(bad, 3, fingerprint="aaaa")


def test_store_is_atomic_and_detects_truncation(tmp_path, monkeypatch):
    path = tmp_path / "g"
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_store(path, {"x": 1}, {"a": a, "b": np.arange(5, dtype=np.uint8)})
    header, arrays = read_store(path)
    assert header == {"x": 1}
    np.testing.assert_array_equal(arrays["a"], a)
    assert all(spec_offset % 64 == 0 for spec_offset in [arrays["a"].offset, arrays["b"].offset])
    before = path.read_bytes()

    def broken(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("dcq.atomic.os.fsync", broken)  # the write fails after the data went out
    with pytest.raises(DcqError, match="Input/output error"):
        write_store(path, {"x": 2}, {"a": a})
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["g"]
    path.write_bytes(before[:-8])
    with pytest.raises(DcqError, match="truncated"):
        read_store(path)
    path.write_bytes(b"something else entirely")
    with pytest.raises(DcqError, match="not a dcq gallery"):
        read_store(path)


def test_without_faiss_exact_search_works_and_ivf_is_one_line(rng, tmp_path):
    x, q = clustered(rng, people=30)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "q.npy", q)
    code = f"""
import sys
sys.modules["faiss"] = None  # as if faiss were not installed
from dcq.cli import main
assert main(["gallery", "build", {str(tmp_path / 'x.npy')!r}, "--out", {str(tmp_path / 'g')!r}]) == 0
assert main(["gallery", "search", {str(tmp_path / 'g')!r}, {str(tmp_path / 'q.npy')!r}, "-k", "4",
             "--json", {str(tmp_path / 'hits.json')!r}]) == 0
assert main(["gallery", "build", {str(tmp_path / 'x.npy')!r}, "--out", {str(tmp_path / 'g2')!r},
             "--index", "ivf"]) == 2
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    err = run.stderr.strip().splitlines()
    assert len(err) == 1 and "needs faiss" in err[0] and "pip install" in err[0]
    hits = json.loads((tmp_path / "hits.json").read_text())
    np.testing.assert_array_equal(hits["ids"], brute_force(q, x, 4)[0])


def test_cli_build_add_search_json(rng, tmp_path, capsys):
    x, q = clustered(rng, people=40)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "q.npy", q)
    (tmp_path / "labels.txt").write_text("".join(f"person{i // 4}\n" for i in range(len(x))))
    g = str(tmp_path / "g")
    assert main(["gallery", "build", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "labels.txt"),
                 "--out", g]) == 0
    assert main(["gallery", "build", str(tmp_path / "x.npy"), "--out", g]) == 2  # exists: refused
    assert main(["gallery", "search", g, str(tmp_path / "q.npy"), "-k", "3", "--json",
                 str(tmp_path / "hits.json")]) == 0
    hits = json.loads((tmp_path / "hits.json").read_text())
    ref_ids, ref_scores = brute_force(q, x, 3)
    assert hits["ids"] == ref_ids.tolist()
    np.testing.assert_allclose(hits["scores"], ref_scores, atol=1e-5)
    assert hits["labels"] == [[f"person{i // 4}" for i in row] for row in ref_ids.tolist()]
    (tmp_path / "more.txt").write_text("extra\n")
    np.save(tmp_path / "more.npy", q[:1])
    assert main(["gallery", "add", g, str(tmp_path / "more.npy"), "--labels", str(tmp_path / "more.txt")]) == 0
    assert main(["gallery", "search", g, str(tmp_path / "more.npy"), "-k", "1", "--json",
                 str(tmp_path / "hit.json")]) == 0
    hit = json.loads((tmp_path / "hit.json").read_text())
    assert hit["ids"] == [[len(x)]] and hit["labels"] == [["extra"]] and hit["scores"][0][0] == pytest.approx(1)
    (tmp_path / "short.txt").write_text("a\n")
    assert main(["gallery", "build", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "short.txt"),
                 "--out", str(tmp_path / "g3")]) == 2
    assert "1 lines for 160 embeddings" in capsys.readouterr().err


def test_cli_checks_the_model_of_onnx_embeddings(rng, tmp_path, capsys):
    """An embedding folder carries its model's fingerprint; an .npy from another model is refused."""
    from dcq.deploy.embed_job import MANIFEST

    folder = tmp_path / "emb"
    folder.mkdir()
    x, q = clustered(rng, people=10)
    np.save(folder / "shard_00000.npy", x)
    (folder / "shard_00000.txt").write_text("".join(f"img{i}.jpg\n" for i in range(len(x))))
    (folder / MANIFEST).write_text(json.dumps({
        "format": 1, "model": "m.onnx", "fingerprint": "0123456789abcdef", "image_size": 112,
        "embedding_size": 32, "flip": True, "landmarks": None, "shard_size": 100, "rows": len(x),
        "shards": [{"file": "shard_00000.npy", "paths": "shard_00000.txt", "rows": len(x), "first_row": 0}],
        "failed": []}))
    g = str(tmp_path / "g")
    assert main(["gallery", "build", str(folder), "--out", g]) == 0
    assert main(["gallery", "search", g, str(folder), "-k", "1", "--json", str(tmp_path / "h.json")]) == 0
    hits = json.loads((tmp_path / "h.json").read_text())
    assert hits["labels"][5] == ["img5.jpg"] and hits["queries"][5] == "img5.jpg"
    np.save(tmp_path / "q.npy", q)
    assert main(["gallery", "search", g, str(tmp_path / "q.npy")]) == 2
    assert "no model fingerprint" in capsys.readouterr().err


def test_default_nlist():
    assert gallery_module.default_nlist(1_000_000) == 4000
    assert gallery_module.default_nlist(1000) == 25  # 39 training points per cell at least
    assert gallery_module.default_nlist(10) == 1
