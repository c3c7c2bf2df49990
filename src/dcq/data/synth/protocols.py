"""Synthetic benchmark sets in the layouts of IJB-B/C and MegaFace, so the protocols run anywhere.

``synthesize_ijb`` writes insightface's IJB layout (``meta/<name>_face_tid_mid.txt``,
``meta/<name>_name_5pts_score.txt``, ``meta/<name>_template_pair_label.txt``, ``loose_crop/``):

- every identity has 2-4 *templates*; a template has 1-4 *media*; a media is a still (one crop) or,
  with probability 0.4, a "video" of 2-5 frames (crops of one rendered instance, each with its own
  framing), as IJB mixes photos and video frames;
- a crop is an aligned face rendered by `dcq.data.synth.render` at ``image_size``, warped into a
  larger *loose crop* by a random similarity (rotation up to +-0.5 rad, face side 0.6-1.6x
  ``image_size``, random placement) over a random background; the 5 landmarks written are where
  the ArcFace template points (`dcq.align.reference_points`) of the aligned face land, exactly, so
  aligning with them recovers the rendered face; each crop gets a faceness score in [0.5, 1];
- pairs: every two templates of one identity (genuine) and template pairs of two different identities
  (impostor): all of them, or a seeded sample of ``impostor_pairs`` when there are more.

``synthesize_megaface`` writes ``probes/<identity>/<k>.jpg`` (aligned crops, several per identity,
like MegaFace's FaceScrub probe set) and ``distractors/<k>.jpg`` (one image each of identities
never in the probe set).

Identities are numbered from ``first_identity`` (default far above those `dcq synth` trains on:
``0 .. identities + val_identities``), so a model trained on a synthetic set never saw them. Every
file is a pure function of the seed; output does not depend on the number of workers. Everything is
written into a temporary folder inside OUT and moved into place at the end, ``stats.json`` last.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np

from dcq.atomic import write_json
from dcq.errors import DcqError

__all__ = ["IJB_FIRST_IDENTITY", "MEGAFACE_FIRST_IDENTITY", "synthesize_ijb", "synthesize_megaface"]

IJB_FIRST_IDENTITY = 10_000_000
MEGAFACE_FIRST_IDENTITY = 20_000_000
# random-stream tags (dcq.data.synth.identity uses 11-15)
_PLAN, _FACE, _FRAME, _IMPOSTORS, _MEGAFACE = 21, 22, 23, 24, 25
_JOB_IMAGES = 128

_RENDERERS: dict = {}


def _renderer(size: int):
    from dcq.data.synth.render import FaceRenderer

    r = _RENDERERS.get(size)
    if r is None:
        r = _RENDERERS[size] = FaceRenderer(size)
    return r


def _jpeg(image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


# --------------------------------------------------------------------------- loose crops
def loose_crop_geometry(image_size: int, r: np.random.Generator) -> tuple[np.ndarray, int]:
    """A random similarity (2, 3) from aligned-face pixels to loose-crop pixels and the crop side.

    Pixel centres are at integer coordinates (the `dcq.align` convention). The whole aligned square
    lands inside the crop, with a margin of 10-50% of the face size around it.
    """
    angle = r.uniform(-0.5, 0.5)
    scale = r.uniform(0.6, 1.6)
    rot = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    a = float(image_size)
    corners = np.array([[-0.5, -0.5], [a - 0.5, -0.5], [-0.5, a - 0.5], [a - 0.5, a - 0.5]]) @ rot.T
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    span = float((hi - lo).max())
    side = int(math.ceil(span * r.uniform(1.1, 1.5)))
    room = side - (hi - lo)  # free pixels along x and y
    shift = -lo - 0.5 + r.random(2) * (room - 1e-6)
    return np.hstack([rot, shift[:, None]]), side


def _warp_into(face, matrix: np.ndarray, side: int, background):
    """`face` (PIL RGB) warped by the forward `matrix` onto `background` (PIL RGB, side x side)."""
    from PIL import Image

    inv = np.linalg.inv(matrix[:, :2])
    t = -inv @ matrix[:, 2]
    # Pillow samples at pixel-corner coordinates: input = inv (out - 0.5) + t + 0.5
    c = t + 0.5 - inv @ np.array([0.5, 0.5])
    data = (inv[0, 0], inv[0, 1], c[0], inv[1, 0], inv[1, 1], c[1])
    rgba = face.convert("RGBA")
    warped = rgba.transform((side, side), Image.Transform.AFFINE, data=data, resample=Image.Resampling.BILINEAR)
    out = background.copy()
    out.paste(warped, (0, 0), warped)
    return out


def _background(side: int, r: np.random.Generator):
    from PIL import Image

    coarse = (r.random((4, 4, 3)) * 200 + 28).astype(np.uint8)
    return Image.fromarray(coarse).resize((side, side), Image.Resampling.BILINEAR)


def _render_loose(job: tuple) -> list[tuple[bytes, list, float]]:
    """Render a list of media: (identity, instance, frames) -> per frame (JPEG, landmarks, faceness)."""
    from dcq.align import reference_points
    from dcq.data.synth.identity import identity_params

    seed, size, media = job
    renderer = _renderer(size)
    template = reference_points(size)
    out = []
    for identity, instance, frames in media:
        r = np.random.default_rng([seed, _FACE, identity, instance])
        face = renderer.render(identity_params(seed, identity), r)
        for k in range(frames):
            r = np.random.default_rng([seed, _FRAME, identity, instance, k])
            matrix, side = loose_crop_geometry(size, r)
            crop = _warp_into(face, matrix, side, _background(side, r))
            marks = template @ matrix[:, :2].T + matrix[:, 2]
            out.append((_jpeg(crop, 60 + 35 * r.random()), marks.tolist(), float(0.5 + 0.5 * r.random())))
    return out


def _aligned(job: tuple) -> list[bytes]:
    """Aligned crops: (identity, instance) -> JPEG, as the training set's images are made."""
    from dcq.data.synth.render import render_instance

    seed, size, items = job
    return [render_instance(_renderer(size), seed, identity, instance, _MEGAFACE) for identity, instance in items]


class _Pool:
    """Runs jobs in order in this process or in forked workers (results do not depend on which)."""

    def __init__(self, workers: int):
        self.pool = None
        if workers > 1:
            import multiprocessing as mp

            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            self.pool = mp.get_context(method).Pool(int(workers))

    def map(self, fn, jobs):
        return self.pool.imap(fn, jobs) if self.pool else map(fn, jobs)

    def close(self):
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


def _chunks(items: list, seed: int, size: int, per_job: int):
    for s in range(0, len(items), per_job):
        yield seed, size, items[s:s + per_job]


# --------------------------------------------------------------------------- output folder
def _start(out_dir, products: tuple[str, ...]) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / "stats.json").is_file():
        clash = [p for p in products if (out_dir / p).exists()]
        if clash:
            raise DcqError(f"{out_dir}: already holds {clash[0]} that `dcq synth` did not write (no stats.json); "
                           "choose an empty or new output folder")
    tmp = out_dir / f".synth-tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return out_dir, tmp


def _finish(tmp: Path, out_dir: Path, products: tuple[str, ...], stats: dict) -> None:
    """Move the products into place (replacing a previous run's), then stats.json, which marks completion."""
    write_json(tmp / "stats.json", stats, indent=1)
    if (out_dir / "stats.json").exists():
        (out_dir / "stats.json").unlink()
    for name in products:
        dst = out_dir / name
        if dst.is_dir():
            shutil.rmtree(dst)
        if (tmp / name).exists():
            os.replace(tmp / name, dst)
    os.replace(tmp / "stats.json", out_dir / "stats.json")
    shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- IJB
def ijb_plan(identities: int, seed: int, first_identity: int) -> list[tuple[int, int, int, int, int]]:
    """Media of the set: (identity, template id, media id, instance, frames), in file order."""
    plan = []
    template_id, media_id = 0, 0
    for i in range(first_identity, first_identity + identities):
        r = np.random.default_rng([seed, _PLAN, i])
        instance = 0
        for _ in range(int(r.integers(2, 5))):
            template_id += 1
            for _ in range(int(r.integers(1, 5))):
                media_id += 1
                frames = int(r.integers(2, 6)) if r.random() < 0.4 else 1
                plan.append((i, template_id, media_id, instance, frames))
                instance += 1
    return plan


def ijb_pairs(template_identity: np.ndarray, impostor_pairs: int, seed: int) -> np.ndarray:
    """(P, 3) rows t1 t2 label (template ids 1..T, t1 < t2): every genuine pair and the impostor pairs
    (all of them, or a seeded sample of ``impostor_pairs`` distinct ones), sorted by (t1, t2)."""
    ident = np.asarray(template_identity)
    n = len(ident)
    _, group_sizes = np.unique(ident, return_counts=True)
    n_imp = n * (n - 1) // 2 - int((group_sizes * (group_sizes - 1) // 2).sum())
    genuine = []
    for members in np.split(np.argsort(ident, kind="stable"), np.cumsum(group_sizes)[:-1]):
        a, b = np.triu_indices(len(members), k=1)
        genuine.append(np.stack([members[a], members[b]], 1))
    genuine = np.concatenate(genuine)
    if n_imp <= impostor_pairs:
        t1, t2 = np.triu_indices(n, k=1)
        other = ident[t1] != ident[t2]
        impostor = np.stack([t1[other], t2[other]], 1)
    else:
        r = np.random.default_rng([seed, _IMPOSTORS])
        keys = np.zeros(0, dtype=np.int64)
        while len(keys) < impostor_pairs:
            a, b = r.integers(0, n, (2, impostor_pairs + 1024))
            a, b = np.minimum(a, b), np.maximum(a, b)
            ok = ident[a] != ident[b]
            keys = np.unique(np.concatenate([keys, a[ok] * n + b[ok]]))
        keys = np.sort(r.choice(keys, impostor_pairs, replace=False))
        impostor = np.stack([keys // n, keys % n], 1)
    rows = np.concatenate([np.c_[genuine, np.ones(len(genuine), np.int64)],
                           np.c_[impostor, np.zeros(len(impostor), np.int64)]])
    rows = rows[np.lexsort((rows[:, 1], rows[:, 0]))]
    rows[:, :2] += 1
    return rows


_IJB_PRODUCTS = ("meta", "loose_crop")


def synthesize_ijb(out_dir, identities: int = 200, image_size: int = 112, seed: int = 0, name: str = "ijbc",
                   impostor_pairs: int = 2_000_000, first_identity: int = IJB_FIRST_IDENTITY, workers: int = 1,
                   progress: bool = True) -> dict:
    """Write a synthetic IJB-like set (module docstring) to ``out_dir``; returns its stats."""
    from tqdm import tqdm

    if not (isinstance(name, str) and name.isalnum() and name.islower()):  # it starts every meta file name
        raise DcqError(f"IJB set name {name!r}: lower-case letters and digits, as insightface's ijbc and ijbb")
    if identities < 2:
        raise DcqError(f"an IJB set needs at least 2 identities (impostor pairs), got {identities}")
    if not 16 <= int(image_size) <= 1024:
        raise DcqError(f"image_size {image_size} is out of range; use 16..1024 (insightface uses 112)")
    if impostor_pairs < 1:
        raise DcqError(f"impostor_pairs must be at least 1, got {impostor_pairs}")
    plan = ijb_plan(int(identities), int(seed), int(first_identity))
    total = sum(p[4] for p in plan)
    out_dir, tmp = _start(out_dir, _IJB_PRODUCTS)
    t0 = time.perf_counter()
    pool = _Pool(workers)
    try:
        (tmp / "meta").mkdir()
        (tmp / "loose_crop").mkdir()
        media = [(p[0], p[3], p[4]) for p in plan]
        rows = [(p[1], p[2]) for p in plan for _ in range(p[4])]
        bar = tqdm(total=total, desc=f"synth {name}", unit="img", disable=not progress, dynamic_ncols=True)
        row = 0
        with open(tmp / "meta" / f"{name}_face_tid_mid.txt", "w") as tid, \
                open(tmp / "meta" / f"{name}_name_5pts_score.txt", "w") as pts:
            for chunk in pool.map(_render_loose, _chunks(media, int(seed), int(image_size), _JOB_IMAGES // 3)):
                for jpeg, marks, faceness in chunk:
                    image = f"{row + 1}.jpg"
                    (tmp / "loose_crop" / image).write_bytes(jpeg)
                    template_id, media_id = rows[row]
                    tid.write(f"{image} {template_id} {media_id}\n")
                    pts.write(image + "".join(f" {v:.4f}" for xy in marks for v in xy) + f" {faceness:.6f}\n")
                    row += 1
                bar.update(len(chunk))
        bar.close()
        template_identity = np.array([p[0] for p in plan])[np.unique([p[1] for p in plan], return_index=True)[1]]
        pairs = ijb_pairs(template_identity, int(impostor_pairs), int(seed))
        with open(tmp / "meta" / f"{name}_template_pair_label.txt", "w") as f:
            np.savetxt(f, pairs, fmt="%d")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        pool.close()
    stats = {
        "generator": "dcq.data.synth.protocols",
        "profile": "ijb",
        "name": name,
        "seed": int(seed),
        "image_size": int(image_size),
        "identities": int(identities),
        "identity_range": [int(first_identity), int(first_identity) + int(identities)],
        "images": int(total),
        "templates": int(len(template_identity)),
        "media": len(plan),
        "pairs": int(len(pairs)),
        "genuine_pairs": int(pairs[:, 2].sum()),
        "impostor_pairs": int(len(pairs) - pairs[:, 2].sum()),
    }
    _finish(tmp, out_dir, _IJB_PRODUCTS, stats)
    return dict(stats, seconds=time.perf_counter() - t0)


# --------------------------------------------------------------------------- MegaFace
_MEGAFACE_PRODUCTS = ("probes", "distractors")


def synthesize_megaface(out_dir, identities: int = 80, images_per_identity: int = 10, distractors: int = 1000,
                        image_size: int = 112, seed: int = 0, first_identity: int = MEGAFACE_FIRST_IDENTITY,
                        workers: int = 1, progress: bool = True) -> dict:
    """Write a synthetic MegaFace-like set (module docstring) to ``out_dir``; returns its stats."""
    from tqdm import tqdm

    if identities < 1 or images_per_identity < 2:
        raise DcqError(f"a MegaFace probe set needs >= 1 identity with >= 2 images each, got {identities} "
                       f"identities x {images_per_identity} images")
    if distractors < 1:
        raise DcqError(f"distractors must be at least 1, got {distractors}")
    if not 16 <= int(image_size) <= 1024:
        raise DcqError(f"image_size {image_size} is out of range; use 16..1024 (insightface uses 112)")
    probes = [(first_identity + i, k) for i in range(identities) for k in range(images_per_identity)]
    d0 = first_identity + identities
    others = [(d0 + j, 0) for j in range(distractors)]
    out_dir, tmp = _start(out_dir, _MEGAFACE_PRODUCTS)
    t0 = time.perf_counter()
    pool = _Pool(workers)
    width, kwidth, dwidth = len(str(identities - 1)), len(str(images_per_identity - 1)), len(str(distractors - 1))
    bar = tqdm(total=len(probes) + len(others), desc="synth megaface", unit="img", disable=not progress,
               dynamic_ncols=True)
    try:
        row = 0
        for chunk in pool.map(_aligned, _chunks(probes, int(seed), int(image_size), _JOB_IMAGES)):
            for jpeg in chunk:
                i, k = divmod(row, images_per_identity)
                folder = tmp / "probes" / f"id_{i:0{width}d}"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{k:0{kwidth}d}.jpg").write_bytes(jpeg)
                row += 1
            bar.update(len(chunk))
        (tmp / "distractors").mkdir()
        row = 0
        for chunk in pool.map(_aligned, _chunks(others, int(seed), int(image_size), _JOB_IMAGES)):
            for jpeg in chunk:
                (tmp / "distractors" / f"{row:0{dwidth}d}.jpg").write_bytes(jpeg)
                row += 1
            bar.update(len(chunk))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        pool.close()
        bar.close()
    stats = {
        "generator": "dcq.data.synth.protocols",
        "profile": "megaface",
        "seed": int(seed),
        "image_size": int(image_size),
        "probe_identities": int(identities),
        "images_per_identity": int(images_per_identity),
        "probe_images": len(probes),
        "distractors": int(distractors),
        "identity_range": [int(first_identity), int(d0 + distractors)],
    }
    _finish(tmp, out_dir, _MEGAFACE_PRODUCTS, stats)
    return dict(stats, seconds=time.perf_counter() - t0)
