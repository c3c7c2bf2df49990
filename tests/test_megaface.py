"""MegaFace challenge-1 identification: the rule against a brute-force loop, sizes, `dcq eval --megaface`."""

import json

import numpy as np
import pytest
import torch

from dcq.checkpoint import save_checkpoint
from dcq.cli import main
from dcq.data.synth.protocols import synthesize_megaface
from dcq.errors import DcqError
from dcq.eval.megaface import distractor_sizes, megaface_identification
from dcq.models import get_backbone

SIZE, DIM = 32, 16


def brute_force(probes, labels, distractors, sizes, ranks):
    """The challenge's rule written out: each image in turn is its identity's only gallery image."""
    p = probes.astype(np.float64)
    d = distractors.astype(np.float64)
    counts = {n: [] for n in sizes}
    for g in range(len(p)):
        for q in range(len(p)):
            if q == g or labels[q] != labels[g]:
                continue
            s = p[q] @ p[g]
            for n in sizes:
                counts[n].append(int(np.sum(d[:n] @ p[q] >= s)))
    rank1 = [np.mean(np.array(counts[n]) == 0) for n in sizes]
    cmc = [[np.mean(np.array(counts[n]) + 1 <= k) for k in ranks] for n in sizes]
    return rank1, cmc


def exact_unit_vectors(rng, n):
    """Rows of +-0.5 in 4-d: unit length exactly and dot products in quarters, so ties are exact."""
    return (rng.integers(0, 2, (n, 4)) - 0.5).astype(np.float32)


@pytest.mark.parametrize("exact_ties", [True, False])
def test_rule_equals_a_brute_force_loop(exact_ties):
    rng = np.random.default_rng(7 if exact_ties else 8)
    labels = np.repeat(np.arange(5), [3, 1, 4, 2, 5])  # identity 1 has one image: no pair
    if exact_ties:
        probes, distractors = exact_unit_vectors(rng, len(labels)), exact_unit_vectors(rng, 250)
    else:
        probes = rng.standard_normal((len(labels), 8)).astype(np.float32)
        probes /= np.linalg.norm(probes, axis=1, keepdims=True)
        distractors = rng.standard_normal((250, 8)).astype(np.float32)
        distractors /= np.linalg.norm(distractors, axis=1, keepdims=True)
    # two files read as one, split inside the size 100 segment
    r = megaface_identification(probes, labels, [distractors[:130], distractors[130:]], sizes=[10, 100, 250])
    rank1, cmc = brute_force(probes, labels, distractors, [10, 100, 250], r["cmc_ranks"])
    assert r["distractors"] == [10, 100, 250]
    assert r["pairs"] == 3 * 2 + 4 * 3 + 2 * 1 + 5 * 4 and r["probe_identities"] == 4
    np.testing.assert_allclose(r["rank1"], rank1)
    np.testing.assert_allclose(r["cmc"], cmc)
    assert r["cmc_ranks"][0] == 1 and r["cmc"][0][0] == r["rank1"][0]


def test_chunking_does_not_change_the_counts(monkeypatch):
    import dcq.eval.megaface as mf

    rng = np.random.default_rng(9)
    labels = np.repeat(np.arange(6), 3)
    probes, distractors = exact_unit_vectors(rng, 18), exact_unit_vectors(rng, 400)
    whole = megaface_identification(probes, labels, distractors)
    monkeypatch.setattr(mf, "_SCORE_BLOCK", 18 * 7)  # 7 distractor rows per block
    assert megaface_identification(probes, labels, distractors) == whole


def random_unit(rng, n, d=8):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_index_search_equals_exact_counting_up_to_k():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(11)
    labels = np.repeat(np.arange(6), [2, 3, 4, 2, 5, 3])
    probes, distractors = random_unit(rng, len(labels)), random_unit(rng, 300)
    exact = megaface_identification(probes, labels, distractors, index="exact")
    flat = megaface_identification(probes, labels, distractors, index="flat", index_k=20)
    assert exact["search"] == [{"distractors": n, "search": "exact"} for n in (10, 100, 300)]
    assert [r["search"] for r in flat["search"]] == ["faiss flat index"] * 3
    assert all(r["recall_at_k"] == 1.0 and r["k"] == min(20, r["distractors"]) for r in flat["search"])
    assert flat["rank1"] == exact["rank1"]
    for n, (a, b) in enumerate(zip(exact["cmc"], flat["cmc"])):
        k, every = flat["search"][n]["k"], flat["search"][n]["distractors"] <= 20  # all retrieved: all ranks known
        for rank, x, y in zip(exact["cmc_ranks"], a, b):
            assert (y == x) if rank <= k or every else (y is None)
    assert flat["cmc"][0] == exact["cmc"][0]  # 10 distractors, all retrieved


def test_auto_searches_large_sets_through_an_ivf_index(monkeypatch):
    pytest.importorskip("faiss")
    import dcq.eval.megaface as mf

    rng = np.random.default_rng(12)
    labels = np.repeat(np.arange(8), 3)
    probes, distractors = random_unit(rng, len(labels), 16), random_unit(rng, 4000, 16)
    monkeypatch.setattr(mf, "INDEX_MIN_ROWS", 1000)
    r = megaface_identification(probes, labels, distractors, sizes=[100, 1000, 4000], index_k=50)
    assert [s["search"] for s in r["search"]] == ["exact", "faiss ivf index", "faiss ivf index"]
    for s in r["search"][1:]:
        assert 0.5 <= s["recall_at_k"] <= 1.0 and s["recall_probes"] == len(labels)
        assert set(s["params"]) == {"nlist", "nprobe"}
    exact = megaface_identification(probes, labels, distractors, sizes=[100, 1000, 4000], index="exact")
    assert r["rank1"][0] == exact["rank1"][0]
    assert all(abs(a - b) <= 0.25 for a, b in zip(r["rank1"], exact["rank1"]))


def test_default_sizes_are_powers_of_ten_and_all():
    assert distractor_sizes(1000) == [10, 100, 1000]
    assert distractor_sizes(2500) == [10, 100, 1000, 2500]
    assert distractor_sizes(7) == [7]
    assert distractor_sizes(500, [100, 10, 100]) == [10, 100]
    with pytest.raises(DcqError, match="more than the 500"):
        distractor_sizes(500, [1000])


def test_input_errors():
    rng = np.random.default_rng(0)
    p = exact_unit_vectors(rng, 4)
    with pytest.raises(DcqError, match="two images"):
        megaface_identification(p, np.arange(4), exact_unit_vectors(rng, 10))
    with pytest.raises(DcqError, match="same model"):
        megaface_identification(p, np.array([0, 0, 1, 1]), np.zeros((10, 8), np.float32))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("megaface")
    torch.manual_seed(0)
    net = get_backbone("cpunet", embedding_size=DIM, image_size=SIZE)
    save_checkpoint(d / "m.pt", {"model": {"backbone": "cpunet", "embedding_size": DIM, "image_size": SIZE},
                                 "feature_extractor": net.state_dict(), "weight_generator": None})
    synthesize_megaface(d / "mf", identities=4, images_per_identity=3, distractors=120, image_size=SIZE,
                        progress=False)
    return d


def test_synthetic_set_layout(files):
    stats = json.loads((files / "mf" / "stats.json").read_text())
    folders = sorted((files / "mf" / "probes").iterdir())
    assert len(folders) == 4 and all(len(list(f.glob("*.jpg"))) == 3 for f in folders)
    assert len(list((files / "mf" / "distractors").glob("*.jpg"))) == 120 == stats["distractors"]
    lo, hi = stats["identity_range"]
    assert hi - lo == 4 + 120 and lo >= 10**6  # probe and distractor identities: disjoint, far from training


def test_dcq_eval_megaface_end_to_end(files, capsys):
    d = files
    assert main(["embed", str(d / "m.pt"), str(d / "mf" / "distractors"), "--out", str(d / "dist.npy")]) == 0
    assert main(["eval", str(d / "m.pt"), "--megaface", str(d / "mf"), "--megaface-distractors",
                 str(d / "dist.npy"), "--json", str(d / "o.json")]) == 0
    capsys.readouterr()
    r = json.loads((d / "o.json").read_text())["megaface"]
    assert r["distractors"] == [10, 100, 120] and len(r["rank1"]) == 3 and r["pairs"] == 4 * 3 * 2
    # recompute from the same embeddings with the brute-force rule
    from dcq.data.folder import ImageFolderDataset
    from dcq.encoders import open_encoder as open_model

    model = open_model(d / "m.pt")
    probes = ImageFolderDataset(d / "mf" / "probes")
    emb = model.embed(np.stack([probes.image(i, SIZE) for i in range(len(probes))]))
    rank1, _ = brute_force(emb, probes.labels, np.load(d / "dist.npy"), [10, 100, 120], [1])
    np.testing.assert_allclose(r["rank1"], rank1)
    pytest.importorskip("faiss")  # the same through an HNSW index: the JSON says so, with its recall
    assert main(["eval", str(d / "m.pt"), "--megaface", str(d / "mf"), "--megaface-distractors",
                 str(d / "dist.npy"), "--megaface-index", "hnsw", "--megaface-k", "5",
                 "--json", str(d / "h.json")]) == 0
    assert "recall of the exact top 5" in capsys.readouterr().out
    h = json.loads((d / "h.json").read_text())["megaface"]
    assert [s["search"] for s in h["search"]] == ["faiss hnsw index"] * 3
    assert all(0.0 <= s["recall_at_k"] <= 1.0 and s["k"] == 5 for s in h["search"])
    assert h["cmc"][0][h["cmc_ranks"].index(10)] is None  # beyond the 5 retrieved


def test_megaface_option_errors(files, capsys):
    d = files
    rc = main(["eval", str(d / "m.pt"), "--megaface", str(d / "mf")])
    err = capsys.readouterr().err
    assert rc == 2 and "--megaface-distractors" in err and len(err.strip().splitlines()) == 1
    np.save(d / "wrong.npy", np.zeros((20, DIM + 1), np.float32))
    rc = main(["eval", str(d / "m.pt"), "--megaface", str(d / "mf"), "--megaface-distractors", str(d / "wrong.npy")])
    err = capsys.readouterr().err
    assert rc == 2 and "same model" in err and "Traceback" not in err


def test_onnx_model_and_shard_folder_give_the_same_result(files, capsys):
    pytest.importorskip("dcq.deploy.embed_job")
    d = files
    onnx_path = d / "m.onnx"
    assert main(["export", str(d / "m.pt"), "--onnx", str(onnx_path), "--encoder", "feature_extractor"]) == 0
    if not (d / "dist.npy").is_file():
        assert main(["embed", str(d / "m.pt"), str(d / "mf" / "distractors"), "--out", str(d / "dist.npy")]) == 0
    assert main(["embed", "--onnx", str(onnx_path), str(d / "mf" / "distractors"), "--out", str(d / "shards"),
                 "--shard-size", "50"]) == 0  # 3 shards
    runs = {"pt": (d / "m.pt", d / "dist.npy"), "onnx": (onnx_path, d / "shards")}
    for name, (model, dist) in runs.items():
        assert main(["eval", str(model), "--megaface", str(d / "mf"), "--megaface-distractors", str(dist),
                     "--json", str(d / f"{name}.json")]) == 0
    capsys.readouterr()
    a = json.loads((d / "pt.json").read_text())["megaface"]
    b = json.loads((d / "onnx.json").read_text())["megaface"]
    assert a["distractors"] == b["distractors"] == [10, 100, 120]
    np.testing.assert_allclose(a["rank1"], b["rank1"], atol=1.0 / a["pairs"] + 1e-12)


def test_shards_of_another_onnx_model_are_refused(files, tmp_path, capsys):
    pytest.importorskip("dcq.deploy.embed_job")
    d = files
    torch.manual_seed(5)
    other = get_backbone("cpunet", embedding_size=DIM, image_size=SIZE)
    save_checkpoint(tmp_path / "o.pt", {"model": {"backbone": "cpunet", "embedding_size": DIM, "image_size": SIZE},
                                        "feature_extractor": other.state_dict(), "weight_generator": None})
    for name in ("o", "m"):
        src = tmp_path / "o.pt" if name == "o" else d / "m.pt"
        assert main(["export", str(src), "--onnx", str(tmp_path / f"{name}.onnx"), "--encoder",
                     "feature_extractor"]) == 0
    assert main(["embed", "--onnx", str(tmp_path / "o.onnx"), str(d / "mf" / "distractors"), "--out",
                 str(tmp_path / "shards")]) == 0
    capsys.readouterr()
    rc = main(["eval", str(tmp_path / "m.onnx"), "--megaface", str(d / "mf"), "--megaface-distractors",
               str(tmp_path / "shards")])
    err = capsys.readouterr().err
    assert rc == 2 and "another model" in err and len(err.strip().splitlines()) == 1
