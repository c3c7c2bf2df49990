"""`dcq embed --onnx`: a photo collection embedded into resumable ``.npy`` shards.

The output folder holds ``shard_00000.npy`` (rows of float32 embeddings) with ``shard_00000.txt``
(the image of each row, one path per line) and ``manifest.json``: the model (path, fingerprint,
sizes, flip), the shards in order with their first global row, and the files that could not be
embedded with the reason. Shards and manifest are written atomically, shard first, so a run
stopped at any moment leaves a consistent folder; the next run with the same arguments skips the
images already in a shard or already failed and continues. Batches restart at every shard
boundary, so a resumed run computes the same shards as one that never stopped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from dcq.atomic import atomic_write, write_json
from dcq.errors import DcqError

FORMAT = 1
MANIFEST = "manifest.json"


def read_manifest(folder) -> dict:
    """The manifest of an embedding folder written by `dcq embed --onnx`."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise DcqError(f"{folder}: no {MANIFEST}; give a folder written by `dcq embed --onnx MODEL ... --out DIR`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DcqError(f"{path}: unreadable manifest ({exc}); delete the folder and embed again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DcqError(f"{path}: not a dcq embedding manifest of format {FORMAT}")
    return manifest


def _shard_paths(folder: Path, shard: dict) -> list[str]:
    return (folder / shard["paths"]).read_text(encoding="utf-8").splitlines()


def read_shards(folder, mmap: bool = True) -> tuple[list[np.ndarray], list[str], dict]:
    """The (rows, d) embeddings of every shard in row order (memory-mapped unless ``mmap=False``), the
    image path of each row, the manifest. `dcq.deploy.embedding_set` reads every embedding set with it."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    arrays, paths = [], []
    for shard in manifest["shards"]:
        try:
            arrays.append(np.load(folder / shard["file"], mmap_mode="r" if mmap else None, allow_pickle=False))
            paths += _shard_paths(folder, shard)
        except (OSError, ValueError) as exc:
            raise DcqError(f"{folder / shard['file']}: missing or unreadable shard ({exc})") from None
        if len(arrays[-1]) != shard["rows"]:
            raise DcqError(f"{folder / shard['file']}: {len(arrays[-1])} rows, the manifest says {shard['rows']}")
    return arrays, paths, manifest


def read_embeddings(folder, mmap: bool = True) -> tuple[np.ndarray, list[str], dict]:
    """(N, d) embeddings of every shard in row order, the image path of each row, the manifest."""
    arrays, paths, manifest = read_shards(folder, mmap)
    d = int(manifest["embedding_size"])
    emb = np.concatenate(arrays) if arrays else np.empty((0, d), dtype=np.float32)
    return emb, paths, manifest


def _settings(embedder, flip: bool, aligned_by: str | None, shard_size: int) -> dict:
    return {"model": str(embedder.path), "fingerprint": embedder.fingerprint, "image_size": embedder.image_size,
            "embedding_size": embedder.embedding_size, "flip": bool(flip), "landmarks": aligned_by,
            "shard_size": int(shard_size)}


def _start(folder: Path, settings: dict) -> dict:
    """The manifest to continue: the folder's own when it holds a run with the same settings."""
    if not (folder / MANIFEST).exists():
        if folder.exists() and any(folder.iterdir()):
            raise DcqError(f"--out {folder}: a folder holding other files; give a new or empty folder")
        return {"format": FORMAT, **settings, "rows": 0, "shards": [], "failed": []}
    manifest = read_manifest(folder)
    for key in ("fingerprint", "image_size", "flip", "landmarks", "shard_size"):
        if key == "shard_size" and settings[key] != manifest.get(key):
            print(f"note: continuing with the folder's --shard-size {manifest[key]}", file=sys.stderr)
            continue
        if manifest.get(key) != settings[key]:
            raise DcqError(f"--out {folder} holds embeddings made with {key}={manifest.get(key)!r}, this run has "
                           f"{settings[key]!r}; use another --out folder (or the same settings to continue)")
    return manifest


def embed_collection(embedder, files: list[Path], out, *, batch_size: int = 256, flip: bool = True,
                     shard_size: int = 65536, landmarks=None, aligned_by: str | None = None,
                     progress: bool = False) -> dict:
    """Embed ``files`` into shards under ``out`` (continuing a stopped run there); the final manifest.

    ``landmarks``: a callable path -> (5, 2) points (photos are aligned), or None (files are
    aligned crops). ``aligned_by`` names the landmark file in the manifest.
    """
    from tqdm import tqdm

    from dcq.deploy.photos import BadImage, load_crop

    if batch_size < 1 or shard_size < 1:
        raise DcqError(f"--batch-size and --shard-size must be >= 1, got {batch_size} and {shard_size}")
    folder = Path(out)
    manifest = _start(folder, _settings(embedder, flip, aligned_by, shard_size))
    shard_size = int(manifest["shard_size"])
    done = {Path(p).resolve() for shard in manifest["shards"] for p in _shard_paths(folder, shard)}
    done |= {Path(f["path"]).resolve() for f in manifest["failed"]}
    todo = [f for f in files if f.resolve() not in done]
    size = embedder.image_size
    rows: list[np.ndarray] = []
    paths: list[str] = []
    failed: list[dict] = []
    crops: list[np.ndarray] = []

    def run_batch():
        if crops:
            rows.append(embedder.embed(np.stack(crops), flip=flip))
            crops.clear()

    def commit_shard():
        run_batch()
        if not paths and not failed:
            return
        index = len(manifest["shards"])
        if paths:
            name = f"shard_{index:05d}"
            emb = np.concatenate(rows)
            atomic_write(folder / f"{name}.npy", lambda f: np.save(f, emb, allow_pickle=False))
            atomic_write(folder / f"{name}.txt", lambda f: f.write("".join(p + "\n" for p in paths).encode()))
            manifest["shards"].append({"file": f"{name}.npy", "paths": f"{name}.txt", "rows": len(paths),
                                       "first_row": manifest["rows"]})
            manifest["rows"] += len(paths)
        manifest["failed"] += failed
        write_json(folder / MANIFEST, manifest, indent=1)
        rows.clear(), paths.clear(), failed.clear()

    with tqdm(total=len(todo), desc="embedding", unit="img", dynamic_ncols=True, disable=not progress) as bar:
        for f in todo:
            try:
                crops.append(load_crop(f, size, landmarks(f) if landmarks is not None else None))
                paths.append(str(f))
            except BadImage as exc:
                failed.append({"path": str(f), "reason": str(exc)})
            if len(crops) == batch_size:
                run_batch()
            if len(paths) == shard_size:
                commit_shard()
            bar.update(1)
        commit_shard()
    if not (folder / MANIFEST).exists():  # nothing to do and nothing written yet: an empty collection
        write_json(folder / MANIFEST, manifest, indent=1)
    return manifest
