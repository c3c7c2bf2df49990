"""dcq.align against independent computations: a linear least-squares similarity, a per-pixel
bilinear warp written out here, Pillow's affine warp, and landmarks that must land on the template."""

import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dcq.align import (ARCFACE_TEMPLATE_112, align_face, estimate_similarity, read_landmarks,
                       reference_points)
from dcq.cli import main
from dcq.errors import DcqError


def similarity(scale, angle, tx, ty):
    c, s = scale * math.cos(angle), scale * math.sin(angle)
    return np.array([[c, -s, tx], [s, c, ty]])


def apply(m, pts):
    return pts @ m[:, :2].T + m[:, 2]


def test_template_is_insightfaces_arcface_points_and_scales():
    assert ARCFACE_TEMPLATE_112.shape == (5, 2) and ARCFACE_TEMPLATE_112.dtype == np.float64
    assert ARCFACE_TEMPLATE_112[0, 0] == 38.2946 and ARCFACE_TEMPLATE_112[4, 1] == 92.2041
    assert ARCFACE_TEMPLATE_112[0, 0] < ARCFACE_TEMPLATE_112[1, 0]  # left eye left of the right eye (image x)
    np.testing.assert_allclose(reference_points(224), ARCFACE_TEMPLATE_112 * 2)
    np.testing.assert_allclose(reference_points(112), ARCFACE_TEMPLATE_112)
    with pytest.raises(DcqError):
        reference_points(3)


def test_similarity_recovers_a_known_transform():
    known = similarity(0.37, -0.6, 12.5, -40.0)
    src = np.array([[200.0, 150.0], [300.0, 160.0], [250, 220], [210, 280], [290, 285]])
    np.testing.assert_allclose(estimate_similarity(src, apply(known, src)), known, atol=1e-10)


def test_similarity_is_the_least_squares_solution_of_the_linear_form(rng):
    """x' = a x - b y + tx, y' = b x + a y + ty is linear in (a, b, tx, ty): solve it with lstsq."""
    src = rng.uniform(0, 400, (5, 2))
    dst = apply(similarity(0.3, 0.4, 5, 9), src) + rng.normal(0, 3.0, (5, 2))
    rows = []
    for (x, y) in src:
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), dst.reshape(-1), rcond=None)[0]
    np.testing.assert_allclose(estimate_similarity(src, dst), [[a, -b, tx], [b, a, ty]], atol=1e-9)


def test_similarity_never_reflects():
    src = ARCFACE_TEMPLATE_112.copy()
    mirrored = src * [-1, 1] + [112, 0]  # a mirror image fits exactly only with a reflection
    m = estimate_similarity(mirrored, src)
    assert np.linalg.det(m[:, :2]) > 0
    with pytest.raises(DcqError, match="coincide"):
        estimate_similarity(np.ones((5, 2)), src)


def _photo(rng, h=150, w=170):
    """A smooth image (bilinear sampling differences between implementations stay below a grey level)."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([127 + 100 * np.sin(xx / 9.0 + c) * np.cos(yy / 13.0 - c) for c in range(3)], axis=2)
    return np.clip(img + rng.normal(0, 2, img.shape), 0, 255).astype(np.uint8)


def test_align_face_equals_a_per_pixel_bilinear_warp(rng):
    photo = _photo(rng)
    forward = similarity(1 / 1.4, 0.25, -10.0, -5.0)  # photo -> crop
    inverse = np.linalg.inv(np.vstack([forward, [0, 0, 1]]))[:2]
    landmarks = apply(inverse, reference_points(48))  # where the template points are in the photo
    crop = align_face(photo, landmarks, 48)
    expected = np.zeros((48, 48, 3))
    h, w = photo.shape[:2]
    for y in range(48):
        for x in range(48):
            sx, sy = apply(inverse, np.array([[x, y]], dtype=float))[0]
            x0, y0 = math.floor(sx), math.floor(sy)
            acc = np.zeros(3)
            for yy, wy in ((y0, 1 - (sy - y0)), (y0 + 1, sy - y0)):
                for xx, wx in ((x0, 1 - (sx - x0)), (x0 + 1, sx - x0)):
                    if 0 <= xx < w and 0 <= yy < h:
                        acc += wx * wy * photo[yy, xx]
            expected[y, x] = acc
    assert crop.shape == (48, 48, 3) and crop.dtype == np.uint8
    assert np.abs(crop.astype(int) - np.rint(expected)).max() <= 1


def test_align_face_agrees_with_pillows_affine_warp(rng):
    """Pillow puts pixel centres at +0.5, so its inverse matrix is the OpenCV one conjugated by that shift."""
    photo = _photo(rng)
    landmarks = apply(similarity(1.6, -0.3, 30, 20), ARCFACE_TEMPLATE_112)
    crop = align_face(Image.fromarray(photo), landmarks, 112)
    m = estimate_similarity(landmarks, ARCFACE_TEMPLATE_112)
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
    shift = inv[:, 2] + 0.5 - inv[:, :2] @ [0.5, 0.5]
    coeffs = (inv[0, 0], inv[0, 1], shift[0], inv[1, 0], inv[1, 1], shift[1])
    ref = np.asarray(Image.fromarray(photo).transform((112, 112), Image.Transform.AFFINE, coeffs,
                                                      Image.Resampling.BILINEAR))
    ys, xs = np.mgrid[0:112, 0:112]
    src = apply(inv, np.stack([xs.ravel(), ys.ravel()], 1).astype(float))
    h, w = photo.shape[:2]
    inside = ((src[:, 0] > 1) & (src[:, 0] < w - 2) & (src[:, 1] > 1) & (src[:, 1] < h - 2)).reshape(112, 112)
    assert inside.mean() > 0.5  # Pillow and OpenCV differ only at the photo's edge
    assert np.abs(crop[inside].astype(int) - ref[inside].astype(int)).max() <= 1


def test_landmarks_land_on_the_template(rng):
    """Five bright dots drawn at the landmarks of a rotated, scaled face end up at the template points."""
    photo = np.zeros((300, 260, 3), dtype=np.uint8)
    landmarks = apply(similarity(2.1, 0.5, 80, -10), ARCFACE_TEMPLATE_112)
    yy, xx = np.mgrid[0:300, 0:260]
    for (x, y) in landmarks:
        photo[(xx - x) ** 2 + (yy - y) ** 2 <= 16] = 255
    crop = align_face(photo, landmarks, 112)[:, :, 0].astype(float)
    cy, cx = np.mgrid[0:112, 0:112]
    for (tx, ty) in ARCFACE_TEMPLATE_112:
        near = ((cx - tx) ** 2 + (cy - ty) ** 2 <= 25) * crop
        centroid = (np.sum(near * cx) / near.sum(), np.sum(near * cy) / near.sum())
        assert abs(centroid[0] - tx) < 0.3 and abs(centroid[1] - ty) < 0.3


def test_align_face_rejects_bad_input():
    with pytest.raises(DcqError, match="5"):
        align_face(np.zeros((50, 50, 3), np.uint8), np.zeros((4, 2)))
    with pytest.raises(DcqError, match="uint8"):
        align_face(np.zeros((50, 50, 3), np.float32), ARCFACE_TEMPLATE_112)
    with pytest.raises(DcqError, match="finite"):
        align_face(np.zeros((50, 50, 3), np.uint8), np.full((5, 2), np.nan))


def test_read_landmarks(tmp_path):
    f = tmp_path / "lm.txt"
    f.write_text("# comment\n1.jpg 1 2 3 4 5 6 7 8 9 10 0.93\n\nsub/2.jpg 10 20 30 40 50 60 70 80 90 100\n")
    got = read_landmarks(f)
    assert list(got) == ["1.jpg", "sub/2.jpg"]
    np.testing.assert_array_equal(got["1.jpg"][0], np.arange(1, 11).reshape(5, 2))
    assert got["1.jpg"][1] == 0.93 and got["sub/2.jpg"][1] is None
    for bad, what in [("a.jpg 1 2 3\n", "11 or 12 fields"), ("a.jpg 1 2 3 4 5 6 7 8 9 x\n", "numbers"),
                      ("a.jpg 1 2 3 4 5 6 7 8 9 10\na.jpg 1 2 3 4 5 6 7 8 9 10\n", "already")]:
        f.write_text(bad)
        with pytest.raises(DcqError, match=what) as err:
            read_landmarks(f)
        assert f"{f}:" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DcqError, match="does not exist"):
        read_landmarks(tmp_path / "missing.txt")


def test_align_module_does_not_import_torch():
    code = "import sys, dcq.align, dcq.deploy.align_cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_dcq_align_writes_crops_and_lists_failures(tmp_path, rng, capsys):
    photos = tmp_path / "photos"
    (photos / "a").mkdir(parents=True)
    photo = _photo(rng)
    Image.fromarray(photo).save(photos / "a" / "x.jpg", quality=95)
    Image.fromarray(photo).save(photos / "y.png")
    (photos / "broken.jpg").write_bytes(b"not an image")
    landmarks = np.round(apply(similarity(1.2, 0.1, 20, 15), ARCFACE_TEMPLATE_112), 3)
    coords = " ".join(f"{v:.3f}" for v in landmarks.ravel())
    (tmp_path / "lm.txt").write_text(f"a/x.jpg {coords} 0.99\ny.png {coords}\nbroken.jpg {coords}\n")
    assert main(["align", str(photos), "--landmarks", str(tmp_path / "lm.txt"), "--out", str(tmp_path / "out"),
                 "--size", "112"]) == 0
    out = capsys.readouterr().out
    assert "wrote 2 aligned" in out and "broken.jpg" in out
    crop = np.asarray(Image.open(tmp_path / "out" / "y.png"))
    np.testing.assert_array_equal(crop, align_face(photo, landmarks, 112))  # PNG is lossless
    assert (tmp_path / "out" / "a" / "x.png").is_file()
    assert "broken.jpg" in (tmp_path / "out" / "failed.txt").read_text()
