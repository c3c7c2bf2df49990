"""Face alignment: five landmarks to the ArcFace template by a similarity transform.

Face-recognition nets are trained on crops where the eyes, nose and mouth corners sit at fixed
places; a face found in a photo must be warped to the same places before it is embedded, or the
embedding is meaningless. The rule is insightface's: the least-squares similarity (rotation,
uniform scale, translation; Umeyama's method, no reflection) from the 5 detected points to the
template, applied with bilinear interpolation and black outside the photo. Coordinates follow
insightface / OpenCV: pixel (column i, row j) has its centre at (i, j).

One implementation serves `dcq align`, `dcq embed` on photos and the IJB protocol. numpy and
Pillow only (no torch), so the deployment path stays light.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dcq.errors import DcqError

# insightface's ArcFace destination for a 112x112 crop: left eye, right eye, nose tip, left and right
# mouth corners (x, y), in pixels.
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
ARCFACE_TEMPLATE_112.setflags(write=False)
MAX_COORDINATE = 1e7  # pixels: far beyond any photo, small enough that no product overflows


def reference_points(image_size: int = 112) -> np.ndarray:
    """The template for a square crop of `image_size` pixels (the 112-pixel one scaled by size/112)."""
    if int(image_size) != image_size or image_size < 8:
        raise DcqError(f"image size {image_size}: give a whole number of pixels, 8 or more (112 is the usual)")
    return ARCFACE_TEMPLATE_112 * (float(image_size) / 112.0)


def _points(points, what: str) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2 or p.shape[0] < 2:
        raise DcqError(f"{what}: expected (N, 2) points with N >= 2, got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise DcqError(f"{what}: points must be finite numbers, got {str(p.tolist())[:200]}")
    if np.abs(p).max() > MAX_COORDINATE:
        raise DcqError(f"{what}: a coordinate of {np.abs(p).max():.3g} pixels is outside any photo "
                       f"(|x|, |y| <= {MAX_COORDINATE:.0e}); check the landmark file")
    return p


def estimate_similarity(src, dst) -> np.ndarray:
    """The (2, 3) similarity matrix M minimising sum |M [src;1] - dst|^2 (Umeyama 1991).

    Rotation and uniform scale only: a reflection would turn a left eye into a right one, so the
    rotation is forced to determinant +1 even when a reflection would fit better.
    """
    src = _points(src, "source landmarks")
    dst = _points(dst, "destination points")
    if src.shape != dst.shape:
        raise DcqError(f"landmarks: {src.shape[0]} source points but {dst.shape[0]} destination points")
    n = src.shape[0]
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    sc, dc = src - mu_s, dst - mu_d
    var_s = float((sc**2).sum()) / n
    if var_s <= 1e-12 * max(1.0, float(np.abs(src).max())) ** 2:
        raise DcqError(f"landmarks {src.tolist()}: all points coincide; "
                       "a face needs distinct eye, nose and mouth points")
    cov = dc.T @ sc / n
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1.0
    rot = u @ np.diag(d) @ vt
    scale = float((s * d).sum()) / var_s
    t = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, t[:, None]])


def _as_rgb_array(image) -> np.ndarray:
    from PIL import Image

    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise DcqError(f"image: expected uint8 pixels, got {a.dtype}")
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3 or a.shape[0] < 1 or a.shape[1] < 1:
        raise DcqError(f"image: expected an H x W x 3 RGB array, got shape {a.shape}")
    return a


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """Bilinear warp of `image` (H, W, 3 uint8) by the forward (2, 3) `matrix` into a size x size crop.

    Each output pixel takes the value at M^-1 (x, y) in the photo; samples outside the photo are
    black (OpenCV's warpAffine with its default constant border).
    """
    a = matrix[:, :2]
    det = float(np.linalg.det(a))
    if not math.isfinite(det) or abs(det) < 1e-12:
        raise DcqError("alignment: the landmarks give a degenerate transform; check the landmark file")
    inv = np.linalg.inv(a)
    inv_t = -inv @ matrix[:, 2]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    h, w = image.shape[:2]
    # Source positions, clamped just outside the photo (all taps there are black either way), so
    # that no coordinate is too large for an integer.
    sx = np.clip(inv[0, 0] * xs + inv[0, 1] * ys + inv_t[0], -2.0, w + 1.0)
    sy = np.clip(inv[1, 0] * xs + inv[1, 1] * ys + inv_t[1], -2.0, h + 1.0)
    x0, y0 = np.floor(sx), np.floor(sy)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)

    def tap(yy, xx):  # the photo's pixels at (yy, xx), black outside it; gathered, the photo is not copied
        inside = ((xx >= 0) & (xx < w) & (yy >= 0) & (yy < h))[..., None]
        return np.where(inside, image[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)], 0).astype(np.float64)

    out = (tap(y0, x0) * (1 - fx) * (1 - fy) + tap(y0, x0 + 1) * fx * (1 - fy)
           + tap(y0 + 1, x0) * (1 - fx) * fy + tap(y0 + 1, x0 + 1) * fx * fy)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def align_face(image, landmarks, image_size: int = 112) -> np.ndarray:
    """The aligned (S, S, 3) uint8 RGB crop of the face whose 5 landmarks (5, 2) are given in `image`
    (a PIL image or an H x W x 3 uint8 array)."""
    points = _points(landmarks, "landmarks")
    if points.shape != (5, 2):
        raise DcqError(f"landmarks: expected 5 (x, y) points, got shape {points.shape}")
    matrix = estimate_similarity(points, reference_points(image_size))
    return warp_affine(_as_rgb_array(image), matrix, int(image_size))


def read_landmarks(path) -> dict[str, tuple[np.ndarray, float | None]]:
    """Landmarks from a text file of `name x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 [score]` lines (insightface's
    layout; points in the order of `ARCFACE_TEMPLATE_112`). Blank lines and `#` comments are skipped.
    Returns name -> ((5, 2) float64 points, score or None)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DcqError(f"landmark file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DcqError(f"cannot read landmark file {path}: {exc}") from None
    out: dict[str, tuple[np.ndarray, float | None]] = {}
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        where = f"{path}:{number}"
        if len(fields) not in (11, 12):
            raise DcqError(f"{where}: expected 'name x1 y1 ... x5 y5 [score]' (11 or 12 fields), got {len(fields)}")
        try:
            values = [float(v) for v in fields[1:]]
        except ValueError:
            raise DcqError(f"{where}: the coordinates and score must be numbers: {line.strip()[:120]}") from None
        if not all(math.isfinite(v) for v in values):
            raise DcqError(f"{where}: the coordinates and score must be finite numbers")
        name = fields[0]
        if name in out:
            raise DcqError(f"{where}: {name} already has landmarks at line {first_line[name]}; "
                           "give one face per image name")
        points = np.array(values[:10], dtype=np.float64).reshape(5, 2)
        out[name] = (points, values[10] if len(values) == 11 else None)
        first_line[name] = number
    return out
