"""Face detection (`dcq detect`, `dcq align` without landmarks, ``--detect``) on real photographs.

The photograph is scikit-image's ``data.astronaut()`` (Eileen Collins, NASA, public domain; shipped
in the scikit-image wheel): one face, about 100 px, frontal. More faces come from tiling, mirroring
and scaling it, each with landmarks derived from the same five measured points. A coffee cup
(``data.coffee()``) holds no face. The detector's ONNX files are exported into a temporary cache
once per session, from the weights `make install` installs.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from skimage import data
from test_deploy_embed import exported  # noqa: F401  (the fixture)

from dcq.align import align_face, read_landmarks
from dcq.cli import main
from dcq.deploy import mtcnn_weights
from dcq.deploy.detect import FaceDetector, OnnxNetworks, nms, pyramid_scales
from dcq.deploy.mtcnn_nets import NETS, TorchNetworks, load_net
from dcq.deploy.orientation import turn
from dcq.errors import DcqError

SRC = str(Path(__file__).resolve().parents[1] / "src")

# The five points of the astronaut's face, measured once by hand on 8-32x nearest-neighbour zooms of
# the 512 x 512 photo with a one-pixel grid and the pixel values beside them (coordinates: pixel
# centres at integers, as dcq.align uses):
# - eyes: the centre of each pupil, the darkest disc inside the iris, the white catchlight ignored.
#   Left: the centroid (203.1, 99.5) of the pixels darker than 50 of 255 (luma) around it, columns
#   201-205 x rows 98-102. Right: the middle of the dark disc, columns 245-248 x rows 100-105 (there
#   the pixels darker than 50 also take in lashes to its right, so their centroid is not used); the
#   iris around it spans columns 242.5-249.5.
# - nose tip: the middle of the bright tip of the nose, between the top of its highlight (row ~125,
#   brightest 229 at rows 126-127, columns 222-223) and the shadow beneath it (rows 130.5-132), across
#   the bright columns 220-228.
# - mouth corners: the outer ends of the dark line where the lips meet, where the lip outline
#   closes: left at column ~202.5 (the crease is darkest at columns 204-205 of row 140 and fades out
#   by column 202), right at column ~243.5 (darkest at 240-242 of row 141, fading by 244).
# The order is dcq.align's: left eye, right eye, nose tip, left and right mouth corners ("left" =
# smaller x in the image).
ASTRONAUT = np.array([[203.0, 99.5], [246.5, 102.5], [224.0, 128.0], [202.5, 139.0], [243.5, 140.5]])
TOLERANCE = 0.05  # of the inter-ocular distance (43.6 px here)
SIDE = 512


@pytest.fixture(scope="module")
def astronaut():
    return data.astronaut()


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """The ONNX export of the shipped weights in a fresh cache folder; DCQ_CACHE points at it."""
    root = tmp_path_factory.mktemp("cache")
    old = os.environ.get(mtcnn_weights.CACHE_ENV)
    os.environ[mtcnn_weights.CACHE_ENV] = str(root)
    files = mtcnn_weights.detector_files()
    yield files
    if old is None:
        del os.environ[mtcnn_weights.CACHE_ENV]
    else:
        os.environ[mtcnn_weights.CACHE_ENV] = old


@pytest.fixture(scope="module")
def detector(cache):
    return FaceDetector(OnnxNetworks(cache, threads=1))


def mirrored(points, width=SIDE):
    """The points of the mirror image: x -> width - 1 - x, and left and right swap."""
    p = points.copy()
    p[:, 0] = width - 1 - p[:, 0]
    return p[[1, 0, 2, 4, 3]]


def scaled(points, factor):
    """The points in the photo resized by ``factor`` (pixel centres scale about the corner edge)."""
    return (points + 0.5) * factor - 0.5


def assert_near(found, expected):
    iod = np.linalg.norm(expected[1] - expected[0])
    error = np.linalg.norm(found - expected, axis=1) / iod
    assert error.max() <= TOLERANCE, f"landmark errors / inter-ocular distance: {error.round(3)}"


def match(faces, expected_sets):
    """The faces in the order of ``expected_sets``, each the face nearest to its expected points."""
    assert len(faces) == len(expected_sets), [(round(f.score, 3), round(f.size)) for f in faces]
    return [min(faces, key=lambda f: np.abs(f.landmarks - e).sum()) for e in expected_sets]


def test_the_three_networks_load_the_shipped_weights_strictly(tmp_path):
    weights = mtcnn_weights.shipped_weights()
    for name, path in weights.items():
        state = torch.load(path, weights_only=True)
        net = load_net(name, path)
        own = net.state_dict()
        assert set(own) == set(state) and all(own[k].shape == state[k].shape for k in own)
        assert all(torch.equal(own[k], state[k]) for k in own)
    pnet = torch.load(weights["pnet"], weights_only=True)
    for broken in ({k: v for k, v in pnet.items() if k != "conv3.bias"}, {**pnet, "extra": torch.zeros(1)},
                   {**pnet, "conv1.weight": torch.zeros(10, 3, 5, 5)}):
        torch.save(broken, tmp_path / "bad.pt")
        with pytest.raises(DcqError, match="not MTCNN pnet weights"):
            load_net("pnet", tmp_path / "bad.pt")
    assert set(NETS) == set(weights)


def test_missing_weights_give_one_line_naming_the_install_command(monkeypatch, tmp_path, capsys):
    from importlib import metadata

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", not_installed)
    with pytest.raises(DcqError, match=r"pip install --no-deps facenet-pytorch==2\.6\.0"):
        mtcnn_weights.shipped_weights()
    monkeypatch.setenv(mtcnn_weights.CACHE_ENV, str(tmp_path / "empty"))
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    assert main(["detect", str(tmp_path / "a.png"), "--out", str(tmp_path / "lm.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install --no-deps facenet-pytorch==2.6.0" in err
    assert not (tmp_path / "lm.txt").exists()


def test_onnx_path_equals_the_torch_path(cache, astronaut):
    onnx_nets, torch_nets = OnnxNetworks(cache, threads=1), TorchNetworks(mtcnn_weights.shipped_weights())
    x = np.random.default_rng(0).uniform(-1, 1, (3, 3, 48, 48)).astype(np.float32)
    for stage in ("pnet", "rnet", "onet"):
        for a, b in zip(getattr(onnx_nets, stage)(x if stage != "rnet" else x[:, :, :24, :24]),
                        getattr(torch_nets, stage)(x if stage != "rnet" else x[:, :, :24, :24])):
            np.testing.assert_allclose(a, b, atol=1e-4)
    photo = np.concatenate([astronaut, astronaut[:, ::-1]], axis=1)
    by_onnx, by_torch = FaceDetector(onnx_nets).detect(photo), FaceDetector(torch_nets).detect(photo)
    assert len(by_onnx) == len(by_torch) == 2
    for a, b in zip(by_onnx, by_torch):
        assert np.abs(a.box - b.box).max() <= 0.5 and np.abs(a.landmarks - b.landmarks).max() <= 0.5
        assert abs(a.score - b.score) < 1e-4


def test_the_astronaut_has_one_face_at_the_measured_points(detector, astronaut):
    faces = detector.detect(astronaut)
    assert len(faces) == 1 and faces[0].score > 0.99
    assert_near(faces[0].landmarks, ASTRONAUT)
    x1, y1, x2, y2 = faces[0].box
    assert x1 < ASTRONAUT[:, 0].min() and x2 > ASTRONAUT[:, 0].max() and y1 < ASTRONAUT[:, 1].min() < y2


def test_tiled_mirrored_and_scaled_copies_give_every_face(detector, astronaut):
    flipped = astronaut[:, ::-1]
    tiles = np.concatenate([np.concatenate([astronaut, flipped], 1), np.concatenate([flipped, astronaut], 1)], 0)
    shift = np.array([SIDE, 0.0]), np.array([0.0, SIDE])
    expected = [ASTRONAUT, mirrored(ASTRONAUT) + shift[0], mirrored(ASTRONAUT) + shift[1],
                ASTRONAUT + shift[0] + shift[1]]
    for face, points in zip(match(detector.detect(tiles), expected), expected):
        assert_near(face.landmarks, points)
    for factor in (0.5, 0.75, 1.5):
        side = round(SIDE * factor)
        photo = np.asarray(Image.fromarray(astronaut).resize((side, side), Image.Resampling.BICUBIC))
        (face,) = match(detector.detect(photo), [scaled(ASTRONAUT, factor)])
        assert_near(face.landmarks, scaled(ASTRONAUT, factor))
    # two sizes side by side: the largest comes first
    half = np.asarray(Image.fromarray(astronaut).resize((SIDE // 2, SIDE // 2), Image.Resampling.BICUBIC))
    pair = np.concatenate([np.pad(half, ((0, SIDE // 2), (0, 0), (0, 0))), astronaut], axis=1)
    faces = detector.detect(pair)
    assert len(faces) == 2 and faces[0].size > 1.6 * faces[1].size
    assert_near(faces[0].landmarks, ASTRONAUT + [SIDE // 2, 0])
    assert_near(faces[1].landmarks, scaled(ASTRONAUT, 0.5))
    # --min-face above the face's size finds none
    assert FaceDetector(detector.networks, min_face=200).detect(astronaut) == []


def test_a_photo_without_a_face_gives_none(detector):
    assert detector.detect(data.coffee()) == []
    assert detector.detect(np.full((300, 400, 3), 128, np.uint8)) == []


def test_nms_and_pyramid():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 4, 4.0]])
    scores = np.array([0.9, 0.95, 0.5, 0.8])
    assert nms(boxes, scores, 0.5).tolist() == [1, 3, 2]  # box 0 overlaps box 1 by IoU 0.68
    assert nms(boxes, scores, 0.5, mode="min").tolist() == [1, 2]  # box 3 lies inside box 1
    scales = pyramid_scales(480, 640, 20)
    assert scales[0] == pytest.approx(0.6) and 480 * scales[-1] >= 12 > 480 * scales[-1] * 0.709


def test_exif_turning_matches_pillow(rng):
    pixels = (rng.random((5, 7, 3)) * 255).astype(np.uint8)
    for orientation in range(1, 9):
        image = Image.fromarray(pixels)
        image.getexif()[0x0112] = orientation
        expected = np.asarray(ImageOps.exif_transpose(image))
        np.testing.assert_array_equal(turn(pixels, orientation), expected, err_msg=f"orientation {orientation}")


def write_photos(folder: Path, astronaut) -> None:
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(astronaut).save(folder / "upright.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned 90 degrees anticlockwise; the viewer turns it clockwise
    Image.fromarray(np.ascontiguousarray(np.rot90(astronaut))).save(folder / "sideways.png", exif=exif.tobytes())
    Image.fromarray(np.concatenate([astronaut, astronaut[:, ::-1]], 1)).save(folder / "sub" / "two.png")
    Image.fromarray(data.coffee()).save(folder / "coffee.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not a photo")


def test_dcq_detect_writes_the_landmark_file_align_reads(cache, astronaut, tmp_path, capsys):
    write_photos(tmp_path / "photos", astronaut)
    out = tmp_path / "lm.txt"
    assert main(["detect", str(tmp_path / "photos"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "broken.jpg" in printed and "4 faces in 3 of 5 photos; 1 without a face" in printed
    marks = read_landmarks(out)
    assert sorted(marks) == ["sideways.png", "sub/two.png", "sub/two.png#1", "upright.jpg"]  # no coffee line
    assert "# skipped" in out.read_text() and "broken.jpg" in out.read_text().splitlines()[-1]
    assert_near(marks["upright.jpg"][0], ASTRONAUT)
    # the EXIF-rotated twin (lossless): the points of its upright pixels, in the upright frame
    (upright,) = FaceDetector(OnnxNetworks(cache, threads=1)).detect(astronaut)
    assert np.abs(marks["sideways.png"][0] - upright.landmarks).max() <= 0.005 + 1e-9
    assert marks["upright.jpg"][1] > 0.99
    assert_near(marks["sub/two.png"][0], ASTRONAUT)
    assert_near(marks["sub/two.png#1"][0], mirrored(ASTRONAUT) + [SIDE, 0])
    assert main(["detect", str(tmp_path / "photos" / "sub"), str(tmp_path / "photos" / "upright.jpg"), "--largest",
                 "--out", str(out)]) == 0
    assert sorted(read_landmarks(out)) == sorted(["two.png", (tmp_path / "photos" / "upright.jpg").as_posix()])


def test_align_without_landmarks_detects_first(cache, astronaut, tmp_path):
    write_photos(tmp_path / "photos", astronaut)
    photos = tmp_path / "photos"
    assert main(["align", str(photos), "--out", str(tmp_path / "crops")]) == 0
    crops = sorted(p.relative_to(tmp_path / "crops").as_posix() for p in (tmp_path / "crops").rglob("*.png"))
    assert crops == ["sideways.png", "sub/two#1.png", "sub/two.png", "upright.png"]
    failed = (tmp_path / "crops" / "failed.txt").read_text()
    assert "coffee.jpg\tno face found" in failed and "broken.jpg" in failed
    # the same crops as aligning by `dcq detect`'s file (its largest face per photo)
    assert main(["detect", str(photos), "--out", str(tmp_path / "lm.txt")]) == 0
    assert main(["align", str(photos), "--landmarks", str(tmp_path / "lm.txt"), "--out", str(tmp_path / "c2")]) == 0
    for name in ("upright.png", "sideways.png", "sub/two.png"):  # equal but for the file's 0.01 px rounding
        a, b = (np.asarray(Image.open(tmp_path / d / name)).astype(int) for d in ("crops", "c2"))
        assert np.abs(a - b).max() <= 3 and np.abs(a - b).mean() < 0.2
    # the EXIF-rotated photo gives the crop of its upright pixels
    (face,) = FaceDetector(OnnxNetworks(cache, threads=1)).detect(astronaut)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "crops" / "sideways.png")),
                                  align_face(astronaut, face.landmarks, 112))
    upright = np.asarray(Image.open(tmp_path / "crops" / "upright.png")).astype(int)
    reference = align_face(np.asarray(Image.open(photos / "upright.jpg")), ASTRONAUT, 112).astype(int)
    assert np.abs(upright - reference).mean() < 12  # near the crop of the measured points (9; turned: 77)


def test_embed_and_search_from_raw_photos(cache, exported, astronaut, tmp_path, capsys):  # noqa: F811
    import json

    from dcq.deploy.embed_job import read_embeddings

    model = exported[1]  # a cpunet (32 px, 16-d) exported to ONNX
    write_photos(tmp_path / "photos", astronaut)
    photos = tmp_path / "photos"
    assert main(["embed", "--onnx", str(model), str(photos), "--detect", "--out", str(tmp_path / "emb")]) == 0
    emb, paths, manifest = read_embeddings(tmp_path / "emb")
    assert sorted(Path(p).name for p in paths) == ["sideways.png", "two.png", "upright.jpg"]
    assert {Path(f["path"]).name for f in manifest["failed"]} == {"coffee.jpg", "broken.jpg"}
    assert manifest["landmarks"].startswith("detected: mtcnn")
    # the same embeddings as with `dcq detect`'s landmark file (but for its 0.01 px rounding)
    assert main(["detect", str(photos), "--out", str(tmp_path / "lm.txt")]) == 0
    assert main(["embed", "--onnx", str(model), str(photos), "--landmarks", str(tmp_path / "lm.txt"),
                 "--out", str(tmp_path / "emb2")]) == 0
    emb2, paths2, _ = read_embeddings(tmp_path / "emb2")
    assert paths2 == paths and (emb2 * emb).sum(axis=1).min() > 0.9995
    assert main(["gallery", "build", str(tmp_path / "emb"), "--out", str(tmp_path / "g")]) == 0
    capsys.readouterr()
    assert main(["gallery", "search", str(tmp_path / "g"), "--onnx", str(model), str(photos / "upright.jpg"),
                 "--detect", "-k", "1", "--json", str(tmp_path / "hits.json")]) == 0
    hits = json.loads((tmp_path / "hits.json").read_text())
    assert hits["labels"][0][0].endswith("upright.jpg") and hits["scores"][0][0] > 0.9999
    assert main(["gallery", "search", str(tmp_path / "g"), str(photos / "upright.jpg"), "--detect"]) == 2
    assert main(["embed", "--onnx", str(model), str(photos), "--detect", "--landmarks", str(tmp_path / "lm.txt"),
                 "--out", str(tmp_path / "emb3")]) == 2


def test_detection_needs_no_torch_once_exported(cache, astronaut, tmp_path):
    Image.fromarray(astronaut).save(tmp_path / "a.png")
    code = ("import sys; from dcq.cli import main; "
            f"rc = main(['detect', {str(tmp_path / 'a.png')!r}, '--out', {str(tmp_path / 'lm.txt')!r}]); "
            "print(rc, 'torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": SRC, mtcnn_weights.CACHE_ENV: str(Path(cache["pnet"]).parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split()[-2:] == ["0", "False"], out.stderr
    assert len(read_landmarks(tmp_path / "lm.txt")) == 1
