"""IJB-B/C 1:1 protocol: meta files, alignment of loose crops, pooling, both TAR rules, `dcq eval --ijb`."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dcq.align import reference_points
from dcq.checkpoint import save_checkpoint
from dcq.cli import main
from dcq.data.synth.protocols import _warp_into, ijb_pairs, loose_crop_geometry, synthesize_ijb
from dcq.errors import DcqError
from dcq.eval import ijb
from dcq.models import get_backbone

SIZE, DIM = 32, 16
FAR_KEYS = ["1e-06", "1e-05", "1e-04", "1e-03", "1e-02", "1e-01"]


@pytest.fixture(scope="module")
def ijb_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("ijb") / "set"
    synthesize_ijb(out, identities=6, image_size=SIZE, seed=3, progress=False)
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    net = get_backbone("cpunet", embedding_size=DIM, image_size=SIZE)
    path = tmp_path_factory.mktemp("ijbckpt") / "m.pt"
    save_checkpoint(path, {"model": {"backbone": "cpunet", "embedding_size": DIM, "image_size": SIZE},
                           "feature_extractor": net.state_dict(), "weight_generator": None})
    return path


def bilinear_inverse_warp(image, matrix, side):
    """Hand-written reference: out(x, y) = bilinear sample of `image` at M^-1 (x, y), -1 outside."""
    inv = np.linalg.inv(matrix[:, :2])
    t = -inv @ matrix[:, 2]
    h, w = image.shape[:2]
    out = np.full((side, side, 3), -1.0)
    for y in range(side):
        for x in range(side):
            sx, sy = inv @ np.array([x, y], float) + t
            x0, y0 = int(math.floor(sx)), int(math.floor(sy))
            if x0 < 0 or y0 < 0 or x0 + 1 >= w or y0 + 1 >= h:
                continue
            fx, fy = sx - x0, sy - y0
            out[y, x] = ((1 - fx) * (1 - fy) * image[y0, x0] + fx * (1 - fy) * image[y0, x0 + 1]
                         + (1 - fx) * fy * image[y0 + 1, x0] + fx * fy * image[y0 + 1, x0 + 1])
    return out


# --------------------------------------------------------------------------- geometry and alignment
def test_loose_crop_warp_matches_a_hand_built_transform():
    rng = np.random.default_rng(0)
    face = (rng.random((20, 20, 3)) * 255).astype(np.uint8)
    angle, scale = 0.4, 1.3
    matrix = np.array([[scale * math.cos(angle), -scale * math.sin(angle), 14.2],
                       [scale * math.sin(angle), scale * math.cos(angle), 3.6]])
    bg = Image.new("RGB", (44, 44), (0, 0, 0))
    got = np.asarray(_warp_into(Image.fromarray(face), matrix, 44, bg)).astype(float)
    want = bilinear_inverse_warp(face.astype(float), matrix, 44)
    inside = want[..., 0] >= 0
    assert inside.sum() > 300
    assert np.abs(got[inside] - want[inside]).mean() < 1.5


def test_crop_geometry_is_the_drawn_similarity_and_holds_the_face():
    r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
    matrix, side = loose_crop_geometry(SIZE, r1)
    # the same draws, written out: angle, scale, margin, placement
    angle, scale = r2.uniform(-0.5, 0.5), r2.uniform(0.6, 1.6)
    rot = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    np.testing.assert_allclose(matrix[:, :2], rot)
    # the aligned square lies inside the crop
    corners = np.array([[-0.5, -0.5], [SIZE - 0.5, -0.5], [-0.5, SIZE - 0.5], [SIZE - 0.5, SIZE - 0.5]])
    placed = corners @ matrix[:, :2].T + matrix[:, 2]
    assert placed.min() >= -0.5 and placed.max() <= side - 0.5


def test_aligning_a_synthetic_crop_recovers_the_rendered_face(ijb_set):
    """The pipeline's alignment of a written crop, with its written landmarks, gives back the face
    rendered for it (re-rendered here from the same random stream); shifted landmarks do not."""
    from dcq.align import align_face
    from dcq.data.synth.identity import identity_params
    from dcq.data.synth.render import FaceRenderer
    from dcq.data.synth.protocols import _FACE, IJB_FIRST_IDENTITY

    meta = ijb.read_ijb_meta(ijb_set, "ijbc")
    crop = np.asarray(Image.open(ijb_set / "loose_crop" / meta.images[0]).convert("RGB"))
    face = np.asarray(FaceRenderer(SIZE).render(identity_params(3, IJB_FIRST_IDENTITY),
                                                np.random.default_rng([3, _FACE, IJB_FIRST_IDENTITY, 0])))

    def error(shift):
        return np.abs(align_face(crop, meta.landmarks[0] + shift, SIZE).astype(float) - face).mean()

    good = error(0.0)
    shifted = [error(np.array(s)) for s in ((0.5, 0), (-0.5, 0), (0, 0.5), (0, -0.5))]
    assert good < 20 and min(shifted) > good + 1.0, (good, shifted)  # half a pixel off is already worse
    # the written landmarks: the template scaled to the crop by a similarity (distances keep their ratios)
    tmpl = reference_points(SIZE)
    d_marks = np.linalg.norm(meta.landmarks[0][:, None] - meta.landmarks[0][None], axis=2)
    d_tmpl = np.linalg.norm(tmpl[:, None] - tmpl[None], axis=2)
    ratio = d_marks[d_tmpl > 0] / d_tmpl[d_tmpl > 0]
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-3)


# --------------------------------------------------------------------------- meta files
def test_meta_files_parse_and_match_the_stats(ijb_set):
    meta = ijb.read_ijb_meta(ijb_set, "ijbc")
    stats = json.loads((ijb_set / "stats.json").read_text())
    assert len(meta.images) == stats["images"] and len(meta.templates) == stats["templates"]
    assert len(meta.pair_labels) == stats["pairs"] and meta.pair_labels.sum() == stats["genuine_pairs"]
    assert meta.landmarks.shape == (stats["images"], 5, 2)
    assert ((meta.faceness >= 0.5) & (meta.faceness <= 1)).all()
    table = np.loadtxt(ijb_set / "meta" / "ijbc_template_pair_label.txt", dtype=np.int64)
    np.testing.assert_array_equal(meta.templates[meta.pair_index], table[:, :2])


def test_pair_file_parsed_in_blocks_equals_loadtxt(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    table = np.c_[rng.integers(1, 10**6, (5000, 2)), rng.integers(0, 2, 5000)]
    path = tmp_path / "p.txt"
    np.savetxt(path, table, fmt="%d")
    monkeypatch.setattr(ijb, "_READ_BLOCK", 997)  # blocks end mid-line
    pairs, labels = ijb._read_pairs(path)
    np.testing.assert_array_equal(pairs, table[:, :2])
    np.testing.assert_array_equal(labels, table[:, 2] == 1)


def test_bad_pair_lines_name_the_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("1 2 1\n3 4 0\n5 x 1\n")
    with pytest.raises(DcqError, match=r"p.txt:3"):
        ijb._read_pairs(path)
    path.write_text("1 2 1\n3 4 2\n")
    with pytest.raises(DcqError, match="0 or 1"):
        ijb._read_pairs(path)


def test_meta_errors_are_one_clear_line(ijb_set, tmp_path):
    with pytest.raises(DcqError, match="--ijb-name ijbc"):
        ijb.read_ijb_meta(ijb_set, "ijbb")
    bad = tmp_path / "bad"
    (bad / "meta").mkdir(parents=True)
    (bad / "loose_crop").mkdir()
    for f in ("face_tid_mid", "name_5pts_score"):
        (bad / "meta" / f"ijbc_{f}.txt").write_text((ijb_set / "meta" / f"ijbc_{f}.txt").read_text())
    (bad / "meta" / "ijbc_template_pair_label.txt").write_text("1 99999 1\n")
    with pytest.raises(DcqError, match="template 99999"):
        ijb.read_ijb_meta(bad, "ijbc")


# --------------------------------------------------------------------------- pooling
def test_pooling_equals_a_loop_over_templates():
    rng = np.random.default_rng(2)
    n, d = 300, 8
    tids = rng.choice([3, 7, 11, 50, 51, 90], n)
    mids = rng.integers(0, 12, n)
    faceness = rng.uniform(0.2, 1.0, n)
    feats = rng.standard_normal((n, d)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    templates, t_index = np.unique(tids, return_inverse=True)
    weights = ijb.pooling_weights(t_index, mids, faceness)
    pooler = ijb.TemplatePooler(len(templates), d)
    cuts = [0, 17, 18, 150, n]  # uneven batches
    for a, b in zip(cuts[:-1], cuts[1:]):
        pooler.add(t_index[a:b], weights[a:b], feats[a:b])
    got = pooler.templates()
    for k, t in enumerate(templates):
        media_vectors = []
        for m in np.unique(mids[tids == t]):
            rows = np.flatnonzero((tids == t) & (mids == m))
            media_vectors.append(np.mean([faceness[i] * feats[i].astype(np.float64) for i in rows], axis=0))
        v = np.sum(media_vectors, axis=0)
        np.testing.assert_allclose(got[k], v / np.linalg.norm(v), atol=1e-6)


def test_pair_scores_are_dot_products():
    rng = np.random.default_rng(3)
    f = rng.standard_normal((40, 6)).astype(np.float32)
    a, b = rng.integers(0, 40, 1000), rng.integers(0, 40, 1000)
    want = [float(np.dot(f[i].astype(np.float64), f[j].astype(np.float64))) for i, j in zip(a, b)]
    np.testing.assert_allclose(ijb.pair_scores(f, a, b, batch=64), want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- TAR rules
def brute_roc(scores, labels):
    """All ROC points (threshold = each distinct score, descending, after the (0, 0) point) and
    scikit-learn's default reduction: a point is dropped when the steps before and after it are equal."""
    pos, neg = labels.sum(), (~labels).sum()
    pts = [(0, 0)]
    for t in sorted(set(scores.tolist()), reverse=True):
        pts.append((int(((scores >= t) & ~labels).sum()), int(((scores >= t) & labels).sum())))
    keep = [pts[0]]
    for i in range(1, len(pts) - 1):
        step_in = (pts[i][0] - pts[i - 1][0], pts[i][1] - pts[i - 1][1])
        step_out = (pts[i + 1][0] - pts[i][0], pts[i + 1][1] - pts[i][1])
        if step_in != step_out:
            keep.append(pts[i])
    keep.append(pts[-1])
    return [(fp / neg, tp / pos) for fp, tp in keep]


def brute_strict(scores, labels, far):
    neg = (~labels).sum()
    if far * neg < 1 - 1e-9:
        return None
    best = 0.0
    for t in list(set(scores.tolist())) + [np.inf]:
        if ((scores >= t) & ~labels).sum() / neg <= far:
            best = max(best, ((scores >= t) & labels).sum() / labels.sum())
    return best


def brute_nearest(points, far):
    dist = [abs(f - far) for f, _ in points]
    best = min(dist)
    return points[max(i for i, d in enumerate(dist) if d == best)][1]


def test_nearest_fpr_rule_on_a_hand_computed_roc():
    # ROC points: (0,0) (.25,.5) (.25,.75) (.75,.75) (.75,1) (1,1)
    scores = np.array([0.8, 0.8, 0.6, 0.2, 0.8, 0.4, 0.4, 0.0])
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    ins = ijb.tar_at_far_insightface(scores, labels, far_targets=(0.1, 0.3, 0.5))
    strict = ijb.tar_at_far_strict(scores, labels, far_targets=(0.1, 0.3, 0.5))
    assert ins == {"1e-01": 0.0, "3e-01": 0.75, "5e-01": 1.0}  # 0.5: FPR .25 and .75 equally near, the higher wins
    assert strict == {"1e-01": None, "3e-01": 0.75, "5e-01": 0.75}


@pytest.mark.parametrize("seed", range(6))
def test_both_rules_equal_a_brute_force_roc(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(30, 400))
    labels = rng.random(n) < rng.uniform(0.05, 0.5)
    labels[:2] = [True, False]
    # coarse scores: many ties inside and across the classes
    scores = np.round(rng.normal(labels * 0.8, 0.5), int(rng.integers(0, 3)))
    points = brute_roc(scores, labels)
    fars = (1e-3, 1e-2, 0.05, 0.1, 0.3)
    ins = ijb.tar_at_far_insightface(scores, labels, far_targets=fars)
    strict = ijb.tar_at_far_strict(scores, labels, far_targets=fars)
    for far in fars:
        key = f"{far:.0e}"
        assert ins[key] == pytest.approx(brute_nearest(points, far)), (key, points)
        want = brute_strict(scores, labels, far)
        assert strict[key] == (None if want is None else pytest.approx(want))


def test_ijb_pairs_are_complete_and_distinct():
    ident = np.repeat(np.arange(7), [2, 3, 2, 4, 2, 3, 2])
    rows = ijb_pairs(ident, impostor_pairs=10**6, seed=0)
    t1, t2 = rows[:, 0] - 1, rows[:, 1] - 1
    assert (t1 < t2).all() and len(rows) == 18 * 17 // 2  # every pair of the 18 templates
    np.testing.assert_array_equal(rows[:, 2] == 1, ident[t1] == ident[t2])
    sampled = ijb_pairs(ident, impostor_pairs=40, seed=0)
    s1, s2 = sampled[:, 0] - 1, sampled[:, 1] - 1
    assert (sampled[:, 2] == 0).sum() == 40 and (sampled[:, 2] == 1).sum() == (rows[:, 2] == 1).sum()
    assert len({(a, b) for a, b in zip(s1, s2)}) == len(sampled)
    assert ((ident[s1] == ident[s2]) == (sampled[:, 2] == 1)).all()


# --------------------------------------------------------------------------- end to end
def test_dcq_eval_ijb_json_and_plot(ijb_set, ckpt, tmp_path, capsys):
    out = tmp_path / "o.json"
    rc = main(["eval", str(ckpt), "--ijb", str(ijb_set), "--json", str(out), "--plots", str(tmp_path / "p"),
               "--batch-size", "7"])
    text = capsys.readouterr().out
    assert rc == 0 and "nearest FPR (insightface)" in text
    r = json.loads(out.read_text())["ijb"]["ijbc"]
    stats = json.loads((ijb_set / "stats.json").read_text())
    assert (r["images"], r["templates"], r["pairs"]) == (stats["images"], stats["templates"], stats["pairs"])
    assert list(r["tar_at_far"]) == FAR_KEYS and list(r["tar_at_far_insightface"]) == FAR_KEYS
    # the strict rule cannot measure a FAR below one impostor; insightface's always answers
    for k in FAR_KEYS:
        measurable = float(k) * r["impostor_pairs"] >= 1
        assert (r["tar_at_far"][k] is None) == (not measurable)
        assert 0.0 <= r["tar_at_far_insightface"][k] <= 1.0
    assert (tmp_path / "p" / "ijb_roc.png").stat().st_size > 1000


def test_embedding_order_and_batching_do_not_change_the_templates(ijb_set):
    """Template vectors from the streamed pipeline equal a one-shot pooling of per-crop embeddings."""
    from dcq.align import align_face

    class PixelModel:  # embedding = the aligned face's pixels, so the check needs no network
        image_size = SIZE

        def embed(self, faces, normalise=True):
            x = faces.reshape(len(faces), -1).astype(np.float32)
            return x / np.linalg.norm(x, axis=1, keepdims=True) if normalise else x

    meta = ijb.read_ijb_meta(ijb_set, "ijbc")
    got = ijb.embed_templates(PixelModel(), meta, batch_size=5)
    faces = np.stack([align_face(np.asarray(Image.open(ijb_set / "loose_crop" / n).convert("RGB")), meta.landmarks[i],
                                 SIZE) for i, n in enumerate(meta.images)])
    feats = PixelModel().embed(faces, normalise=False).astype(np.float64)
    for k in range(len(meta.templates)):
        rows = np.flatnonzero(meta.template_index == k)
        v = sum(np.mean([meta.faceness[i] * feats[i] for i in rows[meta.media_ids[rows] == m]], axis=0)
                for m in np.unique(meta.media_ids[rows]))
        np.testing.assert_allclose(got[k], v / np.linalg.norm(v), atol=1e-5)


# --------------------------------------------------------------------------- insightface's rule, restated
def insightface_n1d1f1_scores(ijb_root, ckpt_path, unit_crops=False):
    """insightface's IJB 1:1 scores, restated from its protocol without dcq's pooling code.

    Crop feature = f(x) + f(mirror x) of the aligned crop, raw (test mode N1; N0 normalises it);
    times the crop's faceness score (D1); averaged over the crops of one media id inside a template;
    summed over the template's media; the template L2-normalised in float64; a pair's score is the
    dot product of its two templates."""
    from dcq.align import align_face
    from dcq.checkpoint import load_checkpoint

    net = get_backbone("cpunet", embedding_size=DIM, image_size=SIZE)
    net.load_state_dict(load_checkpoint(ckpt_path)["feature_extractor"])
    net.eval()
    meta_dir = ijb_root / "meta"
    crops = [line.split() for line in (meta_dir / "ijbc_face_tid_mid.txt").read_text().splitlines() if line]
    marks = {f[0]: f[1:] for f in (line.split() for line in
                                   (meta_dir / "ijbc_name_5pts_score.txt").read_text().splitlines() if line)}
    pairs = np.loadtxt(meta_dir / "ijbc_template_pair_label.txt", dtype=np.int64).reshape(-1, 3)
    feats = {}
    for name, _, _ in crops:
        pts = np.asarray(marks[name][:10], float).reshape(5, 2)
        face = align_face(np.asarray(Image.open(ijb_root / "loose_crop" / name).convert("RGB")), pts, SIZE)
        x = torch.from_numpy(face.astype(np.float32)).permute(2, 0, 1)[None].sub(127.5).div(127.5)
        with torch.no_grad():
            f = (net(x) + net(torch.flip(x, dims=[3])))[0].double().numpy()
        feats[name] = f / np.linalg.norm(f) if unit_crops else f
    templates = {}
    for tid in {int(c[1]) for c in crops}:
        media = {}
        for name, t, m in crops:
            if int(t) == tid:
                media.setdefault(int(m), []).append(float(marks[name][10]) * feats[name])
        v = np.sum([np.mean(rows, axis=0) for rows in media.values()], axis=0)
        templates[tid] = v / np.linalg.norm(v)
    scores = np.array([float(np.dot(templates[a], templates[b])) for a, b, _ in pairs])
    return scores, pairs[:, 2] == 1


def test_pair_scores_equal_insightface_n1d1f1_restated(ijb_set, ckpt, tmp_path, capsys):
    from dcq.encoders import open_encoder

    want, labels = insightface_n1d1f1_scores(ijb_set, ckpt)
    meta = ijb.read_ijb_meta(ijb_set, "ijbc")
    model = open_encoder(ckpt, batch_size=7)
    templates = ijb.embed_templates(model, meta, batch_size=7)
    assert templates.dtype == np.float64
    got = ijb.pair_scores(templates, meta.pair_index[:, 0], meta.pair_index[:, 1])
    assert (meta.pair_labels == labels).all()
    assert np.abs(got - want).max() <= 1e-5
    # unit crop vectors (N0) are a different rule on this set, so the comparison above can fail
    unit = ijb.pair_scores(ijb.embed_templates(model, meta, unit_crops=True), meta.pair_index[:, 0],
                           meta.pair_index[:, 1])
    assert np.abs(unit - want).max() > 1e-3
    assert np.abs(unit - insightface_n1d1f1_scores(ijb_set, ckpt, unit_crops=True)[0]).max() <= 1e-5
    # both TAR rules of `dcq eval --ijb` follow from the restated scores
    out = tmp_path / "r.json"
    assert main(["eval", str(ckpt), "--ijb", str(ijb_set), "--json", str(out)]) == 0
    capsys.readouterr()
    r = json.loads(out.read_text())["ijb"]["ijbc"]
    assert r["test_mode"] == "N1D1F1"
    points = brute_roc(want, labels)
    for k in FAR_KEYS:
        assert r["tar_at_far"][k] == brute_strict(want, labels, float(k))
        assert r["tar_at_far_insightface"][k] == brute_nearest(points, float(k))


def test_cli_errors_are_one_line(ijb_set, ckpt, tmp_path, capsys):
    rc = main(["eval", str(ckpt), "--ijb", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert rc == 2 and "dcq synth DIR --profile ijb" in err and len(err.strip().splitlines()) == 1
    rc = main(["eval", str(ckpt), "--ijb", str(ijb_set), "--ijb-name", "ijbb"])
    err = capsys.readouterr().err
    assert rc == 2 and "--ijb-name ijbc" in err and "Traceback" not in err


def test_onnx_export_gives_the_same_numbers(ijb_set, ckpt, tmp_path, capsys):
    pytest.importorskip("dcq.deploy.onnx_model")
    import io

    from dcq.data import write_bin
    from dcq.encoders import open_encoder as open_model

    onnx_path = tmp_path / "m.onnx"
    assert main(["export", str(ckpt), "--onnx", str(onnx_path), "--encoder", "feature_extractor"]) == 0
    rng = np.random.default_rng(4)
    images = []
    for _ in range(40):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(buf, format="PNG")
        images.append(buf.getvalue())
    write_bin(tmp_path / "tiny.bin", images, [k % 2 == 0 for k in range(20)])
    for model, out in ((ckpt, "pt.json"), (onnx_path, "onnx.json")):
        assert main(["eval", str(model), "--ijb", str(ijb_set), "--bin", str(tmp_path / "tiny.bin"),
                     "--json", str(tmp_path / out)]) == 0
    capsys.readouterr()
    a = json.loads((tmp_path / "pt.json").read_text())
    b = json.loads((tmp_path / "onnx.json").read_text())
    assert a["tiny"]["accuracy"] == pytest.approx(b["tiny"]["accuracy"], abs=1 / 20)
    a, b = a["ijb"]["ijbc"], b["ijb"]["ijbc"]
    for rule in ("tar_at_far", "tar_at_far_insightface"):
        for k in FAR_KEYS:
            assert (a[rule][k] is None) == (b[rule][k] is None)
            if a[rule][k] is not None:  # at most one genuine pair moved across a threshold by float noise
                assert abs(a[rule][k] - b[rule][k]) <= 1.0 / a["genuine_pairs"] + 1e-12
    meta = ijb.read_ijb_meta(ijb_set, "ijbc")
    t_pt = ijb.embed_templates(open_model(ckpt), meta)
    t_onnx = ijb.embed_templates(open_model(onnx_path), meta)
    assert np.abs(t_pt - t_onnx).max() < 1e-4


def test_synthetic_set_is_the_same_with_workers(tmp_path):
    synthesize_ijb(tmp_path / "a", identities=3, image_size=SIZE, seed=1, workers=1, progress=False)
    synthesize_ijb(tmp_path / "b", identities=3, image_size=SIZE, seed=1, workers=2, progress=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) > 20
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
