"""`dcq embed --onnx`: a photo collection embedded into resumable ``.npy`` shards.

The output folder holds ``shard_00000.npy`` (rows of float32 embeddings) with ``shard_00000.json``
(the image of each row: a JSON list of paths, so any name a file system allows, newlines and bytes
that are not UTF-8 included, comes back exactly; folders written before hold ``.txt`` lines) and
``manifest.json``: the model (path, fingerprint, preprocessing, sizes, flip), the shards in order
with their first global row and the sha256 of their files, and the files that could not be
embedded with the reason. Shards and manifest are written atomically, shard first, so a run
stopped at any moment leaves a consistent folder; the next run with the same arguments checks the
shards it continues from against the manifest, skips the images already in a shard or already
failed and continues. Batches restart at every shard boundary, so a resumed run computes the same
shards as one that never stopped. One run at a time: the folder is locked (`dcq.lock`) while a run
writes it, and every file a manifest names must lie in the folder.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from dcq.atomic import atomic_write, write_json
from dcq.errors import DcqError, printable
from dcq.lock import FileLock, remove_stale_temporaries

FORMAT = 1
MANIFEST = "manifest.json"
LOCK = ".dcq.lock"


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
    shards, failed = manifest.get("shards"), manifest.get("failed")
    if not isinstance(shards, list) or not isinstance(failed, list) or type(manifest.get("embedding_size")) is not int \
            or not isinstance(manifest.get("fingerprint"), str) or type(manifest.get("rows")) is not int or not all(
            isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("paths"), str)
            and type(s.get("rows")) is int and s["rows"] >= 0 for s in shards):
        raise DcqError(f"{path}: damaged manifest (its sizes, fingerprint, shards or failed list); delete the folder "
                       "and embed again")
    return manifest


def member(folder: Path, name: str, manifest_path: Path) -> Path:
    """``folder / name`` for a file a manifest names: a plain file name inside the folder (no
    separators, no ``..``, not absolute, not a link out of it), or one `DcqError` line."""
    target = folder / name
    if (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or Path(name).is_absolute()
            or target.resolve().parent != folder.resolve()):
        raise DcqError(f"{manifest_path}: names {printable(name)[:120]!r}, which is not a file in {folder}; "
                       "the manifest was edited: restore it or embed again")
    return target


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _shard_paths(folder: Path, shard: dict) -> list[str]:
    path = member(folder, shard["paths"], folder / MANIFEST)
    if path.suffix == ".txt":  # folders written before names were stored as JSON
        return path.read_text(encoding="utf-8").splitlines()
    names = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError("not a JSON list of paths")
    return names


def _open_shard(folder: Path, shard: dict, d: int, mmap: bool, verify: bool) -> tuple[np.ndarray, list[str]]:
    """The rows and paths of one shard, checked against its manifest entry."""
    npy = member(folder, shard["file"], folder / MANIFEST)
    names = member(folder, shard["paths"], folder / MANIFEST)
    try:
        if verify:
            for key, path in (("sha256", npy), ("paths_sha256", names)):
                if key in shard and file_sha256(path) != shard[key]:
                    raise DcqError(f"{path}: its checksum differs from the manifest's: the file was "
                                   "changed or damaged; delete the folder and embed again")
        rows = np.load(npy, mmap_mode="r" if mmap else None, allow_pickle=False)
        paths = _shard_paths(folder, shard)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise DcqError(f"{npy}: missing or unreadable shard ({str(exc)[:200]})") from None
    if rows.ndim != 2 or rows.dtype != np.float32 or rows.shape[1] != d:
        raise DcqError(f"{npy}: {rows.dtype} {rows.shape}, the manifest says float32 (rows, {d}); embed again")
    if len(rows) != shard["rows"] or len(paths) != shard["rows"]:
        raise DcqError(f"{npy}: {len(rows)} rows and {len(paths)} paths, the manifest says {shard['rows']}; "
                       "the folder was changed by another process: delete it and embed again")
    return rows, paths


def read_shards(folder, mmap: bool = True) -> tuple[list[np.ndarray], list[str], dict]:
    """The (rows, d) embeddings of every shard in row order (memory-mapped unless ``mmap=False``), the
    image path of each row, the manifest; every shard is checked against the manifest (rows, shape,
    checksums when recorded). `dcq.deploy.embedding_set` reads every embedding set with it."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    d = int(manifest["embedding_size"])
    arrays, paths = [], []
    for shard in manifest["shards"]:
        rows, names = _open_shard(folder, shard, d, mmap, verify=True)
        arrays.append(rows)
        paths += names
    return arrays, paths, manifest


def read_embeddings(folder, mmap: bool = True) -> tuple[np.ndarray, list[str], dict]:
    """(N, d) embeddings of every shard in row order, the image path of each row, the manifest."""
    arrays, paths, manifest = read_shards(folder, mmap)
    d = int(manifest["embedding_size"])
    emb = np.concatenate(arrays) if arrays else np.empty((0, d), dtype=np.float32)
    return emb, paths, manifest


def _settings(embedder, flip: bool, aligned_by: str | None, shard_size: int) -> dict:
    from dcq.deploy.metadata import preprocessing_record

    return {"model": str(embedder.path), "fingerprint": embedder.fingerprint, "image_size": embedder.image_size,
            "embedding_size": embedder.embedding_size, "flip": bool(flip), "landmarks": aligned_by,
            "shard_size": int(shard_size), "preprocessing": preprocessing_record(embedder.preprocessing)}


def lock_folder(folder: Path) -> FileLock:
    """Create and lock the output folder for this run (one `dcq embed --onnx` per folder at a time)
    and remove the temporary files a killed run left."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(folder / LOCK, f"--out {folder}")
        lock.acquire("another dcq embed", "wait for it to finish or give another --out folder")
    except (FileExistsError, NotADirectoryError):
        raise DcqError(f"--out {folder}: a part of the path is a file; give a folder") from None
    except OSError as exc:
        raise DcqError(f"--out {folder}: cannot write there ({exc.strerror or exc})") from None
    lock.record_holder()
    remove_stale_temporaries(folder)
    return lock


def _start(folder: Path, settings: dict) -> dict:
    """The manifest to continue: the folder's own when it holds a run with the same settings."""
    if not (folder / MANIFEST).exists():
        if any(p.name != LOCK for p in folder.iterdir()):
            raise DcqError(f"--out {folder}: a folder holding other files; give a new or empty folder")
        return {"format": FORMAT, **settings, "rows": 0, "shards": [], "failed": []}
    manifest = read_manifest(folder)
    for key in ("fingerprint", "image_size", "flip", "landmarks", "shard_size", "preprocessing"):
        if key == "shard_size" and settings[key] != manifest.get(key):
            print(f"note: continuing with the folder's --shard-size {manifest[key]}", file=sys.stderr)
            continue
        if key == "preprocessing" and key not in manifest:  # written before it was recorded
            manifest[key] = settings[key]
        if manifest.get(key) != settings[key]:
            raise DcqError(f"--out {folder} holds embeddings made with {key}={manifest.get(key)!r}, this run has "
                           f"{settings[key]!r}; use another --out folder (or the same settings to continue)")
    return manifest


def _done(folder: Path, manifest: dict) -> set[Path]:
    """The images a stopped run already embedded or listed as failed; every shard it continues
    from is checked against the manifest first (rows, checksums), so a damaged folder is not extended."""
    d = int(manifest["embedding_size"])
    row = 0
    done: set[Path] = set()
    for shard in manifest["shards"]:
        if shard.get("first_row") != row:
            raise DcqError(f"{folder / MANIFEST}: shard {printable(shard['file'])} starts at row "
                           f"{shard.get('first_row')}, expected {row}; delete the folder and embed again")
        done |= {Path(p).resolve() for p in _open_shard(folder, shard, d, mmap=True, verify=True)[1]}
        row += shard["rows"]
    if row != manifest.get("rows"):
        raise DcqError(f"{folder / MANIFEST}: its shards hold {row} rows, it says {manifest.get('rows')}; "
                       "delete the folder and embed again")
    return done | {Path(f["path"]).resolve() for f in manifest["failed"] if isinstance(f, dict) and "path" in f}


def embed_collection(embedder, files: list[Path], out, *, batch_size: int = 256, flip: bool = True,
                     shard_size: int = 65536, landmarks=None, aligned_by: str | None = None,
                     progress: bool = False) -> dict:
    """Embed ``files`` into shards under ``out`` (continuing a stopped run there); the final manifest.

    ``landmarks``: a callable path -> (5, 2) points (photos are aligned), or None (files are
    aligned crops). ``aligned_by`` names the landmark file in the manifest. The folder is locked
    for the run: a second run into it stops with one line instead of mixing its shards in.
    """
    if batch_size < 1 or shard_size < 1:
        raise DcqError(f"--batch-size and --shard-size must be >= 1, got {batch_size} and {shard_size}")
    folder = Path(out)
    lock = lock_folder(folder)
    try:
        return _embed(embedder, files, folder, batch_size, flip, shard_size, landmarks, aligned_by, progress)
    finally:
        lock.release()


def _embed(embedder, files, folder: Path, batch_size, flip, shard_size, landmarks, aligned_by, progress) -> dict:
    from tqdm import tqdm

    from dcq.deploy.photos import BadImage, load_crop

    manifest = _start(folder, _settings(embedder, flip, aligned_by, shard_size))
    shard_size = int(manifest["shard_size"])
    done = _done(folder, manifest)
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
            names = (json.dumps(paths) + "\n").encode()  # JSON escapes newlines and undecodable bytes alike
            atomic_write(folder / f"{name}.npy", lambda f: np.save(f, emb, allow_pickle=False))
            atomic_write(folder / f"{name}.json", lambda f: f.write(names))
            manifest["shards"].append({"file": f"{name}.npy", "paths": f"{name}.json", "rows": len(paths),
                                       "first_row": manifest["rows"], "sha256": file_sha256(folder / f"{name}.npy"),
                                       "paths_sha256": hashlib.sha256(names).hexdigest()})
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
