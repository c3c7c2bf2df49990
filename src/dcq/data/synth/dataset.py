"""The embedded synthetic face dataset: long-tailed identities rendered as face-like images.

Real face sets cannot be downloaded here, yet DCQ needs data that behaves like faces where it
matters: many identities with few images, and nuisance variation (pose, light, expression,
occlusion, compression) large enough that raw pixels match poorly while a trained network learns the
identity. Each identity is a vector of latent parameters (face shape, skin tone, eyes, brows, nose,
mouth, hair, facial hair, marks); each image draws a fresh instance (pose, yaw, light, expression,
blur, noise, occluders, background, JPEG quality) and is drawn with PIL at the requested size.

Every image is a pure function of ``(seed, identity, instance)``, so output is identical for a seed
whatever the number of worker processes.

Modules: `identity` (latent faces, named random draws), `render` (drawing an instance),
`profiles` (images per identity, buckets); this one renders in worker processes and writes the
dataset (``synthesize``).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

import numpy as np

from dcq.atomic import write_json
from dcq.data.synth.identity import _INSTANCE, _PAIRS, _VAL_INSTANCE, identity_params
from dcq.data.synth.profiles import PROFILES, count_histogram, images_per_identity
from dcq.data.synth.render import FaceRenderer, render_instance
from dcq.errors import DcqError

__all__ = ["PROFILES", "FaceRenderer", "identity_params", "images_per_identity", "render_instance", "synthesize",
           "count_histogram"]

GENERATOR_VERSION = 1

# --------------------------------------------------------------------------- rendering jobs
_RENDERERS: dict[int, FaceRenderer] = {}


def _renderer(image_size: int) -> FaceRenderer:
    r = _RENDERERS.get(image_size)
    if r is None:
        r = _RENDERERS[image_size] = FaceRenderer(image_size)
    return r


def _render_job(job: tuple) -> list[bytes]:
    """Render a list of (identity, first instance, count, stream) runs; used in-process and by workers."""
    seed, image_size, runs = job
    renderer = _renderer(image_size)
    out = []
    for identity, first, count, stream in runs:
        ident = identity_params(seed, identity)
        for k in range(first, first + count):
            out.append(render_instance(renderer, seed, identity, k, stream, ident))
    return out


def _jobs(seed: int, image_size: int, runs: list[tuple], per_job: int = 256):
    """Group runs into jobs of about per_job images, splitting long runs."""
    batch, n = [], 0
    for identity, first, count, stream in runs:
        while count > 0:
            take = min(count, per_job - n)
            batch.append((identity, first, take, stream))
            first += take
            count -= take
            n += take
            if n >= per_job:
                yield (seed, image_size, batch)
                batch, n = [], 0
    if batch:
        yield (seed, image_size, batch)


class _Renderer:
    """Runs jobs in order, in this process or in a pool; yields image bytes."""

    def __init__(self, workers: int):
        self.workers = max(1, int(workers))
        self.pool = None
        if self.workers > 1:
            import multiprocessing as mp

            # fork where there is one (no re-import of the caller's script); output does not depend on it
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            self.pool = mp.get_context(method).Pool(self.workers)

    def images(self, seed: int, image_size: int, runs: list[tuple]):
        jobs = _jobs(seed, image_size, runs)
        results = self.pool.imap(_render_job, jobs) if self.pool else map(_render_job, jobs)
        for chunk in results:
            yield from chunk

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
            self.pool = None


# --------------------------------------------------------------------------- verification pairs
def _val_pairs(seed: int, first_identity: int, val_identities: int, pairs: int) -> list[tuple]:
    """10 folds of pairs, positives and negatives alternating inside every fold.

    Returns ``[(identity_a, instance_a, identity_b, instance_b, same), ...]``; every image is a fresh
    instance, and identities are cycled so all of them appear.
    """
    if val_identities < 2:
        raise DcqError(f"val_identities must be at least 2 to form negative pairs, got {val_identities}")
    r = np.random.default_rng([seed, _PAIRS])
    next_instance = np.zeros(val_identities, dtype=np.int64)
    order = r.permutation(val_identities)
    pos_i = 0
    out = []

    def take(local: int) -> tuple[int, int]:
        k = int(next_instance[local])
        next_instance[local] += 1
        return first_identity + local, k

    for j in range(pairs):
        if j % 2 == 0:
            local = int(order[pos_i % val_identities])
            pos_i += 1
            a, b = take(local), take(local)
            out.append((*a, *b, True))
        else:
            la, lb = r.choice(val_identities, size=2, replace=False)
            out.append((*take(int(la)), *take(int(lb)), False))
    return out


# --------------------------------------------------------------------------- synthesize
_PRODUCTS = ("train.rec", "train.idx", "train", "val.bin", "probe.rec", "probe.idx")


def _round_pairs(pairs: int) -> int:
    """Round up to a multiple of 20: 10 folds, each half positive."""
    return max(20, math.ceil(pairs / 20.0) * 20)


def synthesize(out_dir, profile: str = "ms1m", identities: int = 1000, image_size: int = 112,
               fmt: str = "rec", seed: int = 0, val_identities: int | None = None,
               val_pairs: int | None = None, probes_per_identity: int = 1, workers: int = 1,
               progress: bool = True) -> dict:
    """Write a synthetic long-tailed face dataset in insightface formats; returns its stats.

    Files: ``train.rec``/``train.idx`` (header layout) or ``train/<identity>/<n>.jpg``; ``val.bin``
    (pairs of identities never used for training); ``probe.rec``/``probe.idx`` (plain layout,
    held-out images of training identities, label = training label); ``stats.json`` (written last:
    a folder without it is incomplete). Everything is built in a temporary folder inside ``out_dir``
    and moved into place at the end.
    """
    from tqdm import tqdm

    from dcq.data.recordio import write_face_recordio
    from dcq.data.verification_bin import write_bin

    if fmt not in ("rec", "folder"):
        raise DcqError(f"unknown format {fmt!r}; choose 'rec' or 'folder'")
    image_size = int(image_size)
    if not 16 <= image_size <= 1024:
        raise DcqError(f"image_size {image_size} is out of range; use 16..1024 (insightface uses 112)")
    if probes_per_identity < 0:
        raise DcqError(f"probes_per_identity must be >= 0, got {probes_per_identity}")
    counts = images_per_identity(profile, int(identities), seed)
    n_ids = len(counts)
    if val_identities is None:
        val_identities = int(min(2000, max(50, n_ids // 5)))
    if int(val_identities) < 2:
        raise DcqError(f"val_identities must be at least 2 to form negative pairs, got {val_identities}")
    if val_pairs is not None and int(val_pairs) < 1:
        raise DcqError(f"val_pairs must be at least 1, got {val_pairs}")
    val_pairs = _round_pairs(6000 if val_pairs is None else int(val_pairs))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = (out_dir / "stats.json").is_file()
    if not previous:
        clash = [p for p in _PRODUCTS if (out_dir / p).exists()]
        if clash:
            raise DcqError(
                f"{out_dir}: already holds {clash[0]} that `dcq synth` did not write (no stats.json); "
                "choose an empty or new output folder"
            )
    tmp = out_dir / f".synth-tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    t0 = time.perf_counter()
    total = int(counts.sum()) + n_ids * probes_per_identity + 2 * val_pairs
    bar = tqdm(total=total, desc=f"synth {profile}", unit="img", disable=not progress, dynamic_ncols=True)
    engine = _Renderer(workers)
    try:
        # training images, sorted by label
        runs = [(c, 0, int(n), _INSTANCE) for c, n in enumerate(counts)]
        labels = np.repeat(np.arange(n_ids), counts)

        def train_items():
            for lab, img in zip(labels, engine.images(seed, image_size, runs)):
                bar.update(1)
                yield int(lab), img

        if fmt == "rec":
            write_face_recordio(tmp, train_items(), name="train", header=True, num_identities=n_ids)
        else:
            # zero-padded names: sorted folder order (how ImageFolderDataset numbers) = label order
            width = max(6, len(str(n_ids - 1)))
            kwidth = max(4, len(str(int(counts.max()) - 1)))
            (tmp / "train").mkdir()
            prev, k = -1, 0
            for lab, img in train_items():
                d = tmp / "train" / f"id_{lab:0{width}d}"
                if lab != prev:
                    d.mkdir()
                    prev, k = lab, 0
                (d / f"{k:0{kwidth}d}.jpg").write_bytes(img)
                k += 1
        # probes: held-out instances of training identities
        probe_runs = [(c, int(n), probes_per_identity, _INSTANCE) for c, n in enumerate(counts)] \
            if probes_per_identity else []
        probe_labels = np.repeat(np.arange(n_ids), probes_per_identity)

        def probe_items():
            for lab, img in zip(probe_labels, engine.images(seed, image_size, probe_runs)):
                bar.update(1)
                yield int(lab), img

        write_face_recordio(tmp, probe_items(), name="probe", header=False)
        # verification pairs from identities never seen in training
        pairs = _val_pairs(seed, n_ids, val_identities, val_pairs)
        val_runs = []
        for ia, ka, ib, kb, _ in pairs:
            val_runs.append((ia, ka, 1, _VAL_INSTANCE))
            val_runs.append((ib, kb, 1, _VAL_INSTANCE))
        val_images = []
        for img in engine.images(seed, image_size, val_runs):
            val_images.append(img)
            bar.update(1)
        write_bin(tmp / "val.bin", val_images, [p[4] for p in pairs])
    except BaseException:
        engine.close()
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    engine.close()
    bar.close()
    seconds = time.perf_counter() - t0

    stats = {
        "generator": "dcq.data.synth.dataset",
        "generator_version": GENERATOR_VERSION,
        "profile": profile,
        "seed": int(seed),
        "image_size": image_size,
        "format": fmt,
        "identities": n_ids,
        "images": int(counts.sum()),
        "train_images_per_identity": counts.tolist(),
        "histogram": count_histogram(counts),
        "fraction_under_10": float(np.mean(counts < 10)),
        "median_images_per_identity": float(np.median(counts)),
        "mean_images_per_identity": float(np.mean(counts)),
        "max_images_per_identity": int(counts.max()),
        "min_images_per_identity": int(counts.min()),
        "val_pairs": int(val_pairs),
        "val_positive_pairs": int(val_pairs // 2),
        "val_folds": 10,
        "val_identities": int(val_identities),
        "val_identity_range": [n_ids, n_ids + int(val_identities)],
        "probes": int(n_ids * probes_per_identity),
        "probes_per_identity": int(probes_per_identity),
        "files": {"train": "train.rec" if fmt == "rec" else "train/", "val": ["val.bin"], "probe": "probe.rec"},
    }
    write_json(tmp / "stats.json", stats, indent=1)
    _publish(tmp, out_dir, fmt)
    result = dict(stats)
    result["seconds"] = seconds
    result["images_per_second"] = total / max(seconds, 1e-9)
    result["rendered_images"] = total
    return result


def _publish(tmp: Path, out_dir: Path, fmt: str) -> None:
    """Move finished files from tmp into out_dir; stats.json goes last and marks completion."""
    stats = out_dir / "stats.json"
    if stats.exists():
        stats.unlink()
    stale = ["train"] if fmt == "rec" else ["train.rec", "train.idx"]
    for name in stale:
        p = out_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    for name in ("train.rec", "train.idx", "train", "probe.rec", "probe.idx", "val.bin"):
        src = tmp / name
        if not src.exists():
            continue
        dst = out_dir / name
        if src.is_dir():
            if dst.exists():
                trash = out_dir / f".synth-old-{os.getpid()}"
                os.replace(dst, trash)
                os.replace(src, dst)
                shutil.rmtree(trash)
            else:
                os.replace(src, dst)
        else:
            os.replace(src, dst)
    os.replace(tmp / "stats.json", stats)
    shutil.rmtree(tmp, ignore_errors=True)
