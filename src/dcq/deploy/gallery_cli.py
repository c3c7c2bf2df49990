"""`dcq gallery build | add | search`: enrol embeddings in a gallery file and search it.

Embeddings come from `dcq embed`: a folder written by ``dcq embed --onnx`` (its manifest gives the
model fingerprint, and the image paths become the labels) or an ``.npy`` (rows; ``--model`` names
the ``.onnx`` they came from, ``--labels`` a text file with one label per row). `search` also takes
images directly with ``--onnx MODEL`` (aligned crops, or photos with ``--landmarks`` or ``--detect``). No torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from dcq.atomic import ensure_writable, write_json
from dcq.errors import DcqError, printable
from dcq.lock import FileLock, remove_stale_temporaries


def configure_gallery(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="gallery_command", metavar="ACTION", required=True)
    build = sub.add_parser("build", help="enrol embeddings in a new gallery file",
                           description="enrol embeddings in a new gallery file")
    build.add_argument("embeddings", metavar="EMB", help="a `dcq embed --onnx` folder or an (N, d) .npy")
    build.add_argument("--out", required=True, metavar="G", help="gallery file to write")
    build.add_argument("--index", choices=["flat", "ivf", "ivfpq", "hnsw"], default="flat",
                       help="flat: exact (default); ivf, ivfpq, hnsw: approximate faiss indexes for large "
                       "galleries (docs/deploy.md)")
    build.add_argument("--nlist", type=int, default=None, help="ivf cells (default about 4 sqrt(N))")
    build.add_argument("--nprobe", type=int, default=64, help="ivf/ivfpq cells scanned per query (default 64)")
    build.add_argument("--pq-m", type=int, default=None, help="ivfpq: 4-bit sub-quantisers per row (default d/4)")
    build.add_argument("--k-factor", type=int, default=100, help="ivfpq: k x this many candidates re-ranked "
                       "exactly (default 100)")
    build.add_argument("--hnsw-m", type=int, default=32, help="hnsw links per node (default 32)")
    build.add_argument("--ef-construction", type=int, default=80, help="hnsw build breadth (default 80)")
    build.add_argument("--ef-search", type=int, default=128, help="hnsw search breadth (default 128)")
    build.add_argument("--overwrite", action="store_true", help="replace G if it exists")
    add = sub.add_parser("add", help="enrol more embeddings in an existing gallery",
                         description="enrol more embeddings in an existing gallery (ids continue)")
    add.add_argument("gallery", metavar="G")
    add.add_argument("embeddings", metavar="EMB", help="a `dcq embed --onnx` folder or an (N, d) .npy")
    search = sub.add_parser("search", help="the k most similar enrolled faces of each query",
                            description="the k most similar enrolled faces of each query")
    search.add_argument("gallery", metavar="G")
    search.add_argument("queries", nargs="+", metavar="QUERIES", help="a `dcq embed --onnx` folder or an .npy "
                        "of query embeddings; with --onnx, image files or folders")
    search.add_argument("-k", type=int, default=10, help="neighbours per query (default 10)")
    search.add_argument("--json", metavar="OUT", help='write {"ids": [[row, ...k] per query], "scores": [[...]], '
                        '"labels": [[...]] (when the gallery has labels), "queries": [...] (when known)}')
    search.add_argument("--nprobe", type=int, default=None, help="ivf/ivfpq: cells scanned (default: the gallery's)")
    search.add_argument("--k-factor", type=int, default=None, help="ivfpq: re-ranked candidates per neighbour "
                        "(default: the gallery's)")
    search.add_argument("--ef-search", type=int, default=None, help="hnsw: search breadth (default: the gallery's)")
    search.add_argument("--onnx", metavar="MODEL", help="QUERIES are images: embed them with this model first")
    search.add_argument("--landmarks", metavar="FILE", help="with --onnx: align the query photos by these landmarks")
    search.add_argument("--detect", action="store_true", help="with --onnx: the queries are photos; find the "
                        "faces and align the largest of each")
    search.add_argument("--no-flip", action="store_true", help="with --onnx: no flip test")
    search.add_argument("--batch-size", type=int, default=64, help="with --onnx: images per batch (default 64)")
    for p in (build, add, search):
        p.add_argument("--model", metavar="MODEL.onnx", help="for an .npy: the model it was embedded with "
                       "(its fingerprint is checked against the gallery's)")
    for p in (build, add):
        p.add_argument("--labels", metavar="FILE", help="one label per embedding row, one per line (default: the "
                       "image paths of a `dcq embed --onnx` folder; none for an .npy)")


def read_labels(path, rows: int) -> list[str]:
    """One label per line of ``path``; exactly ``rows`` of them."""
    try:
        labels = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DcqError(f"--labels {path}: cannot read it ({exc})") from None
    if len(labels) != rows:
        raise DcqError(f"--labels {path}: {len(labels)} lines for {rows} embeddings; give one label per row")
    return labels


def read_embedding_input(path, model=None) -> tuple[np.ndarray, list[str] | None, dict]:
    """(embeddings, image paths or None, origin) of a `dcq embed` output; origin holds the model's
    ``fingerprint``, the ``preprocessing`` and ``flip`` used (each None where not known)."""
    from dcq.deploy.embedding_set import read_embedding_set

    found = read_embedding_set(path, model, check_finite=False)  # the gallery refuses bad rows itself
    return found.array(), found.names, found.origin()


def lock_gallery(path: Path) -> FileLock:
    """Lock gallery file ``path`` for a read-modify-write (``.NAME.lock`` beside it), so that two
    `build`/`add` at once cannot drop each other's rows; removes temporaries a killed writer left."""
    lock = FileLock(path.parent / f".{path.name}.lock", f"gallery {path}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire("another dcq gallery build/add", "wait for it to finish, then run this again")
    except OSError as exc:
        raise DcqError(f"cannot write gallery {path}: {exc.strerror or exc}") from None
    lock.record_holder()
    remove_stale_temporaries(path.parent, path.name)
    return lock


def _build(args) -> int:
    from dcq.deploy.gallery import Gallery

    out = Path(args.out)
    if out.is_dir():
        raise DcqError(f"cannot write {out}: it is a folder; give a file name")
    with lock_gallery(out):
        if out.exists() and not args.overwrite:
            raise DcqError(f"--out {out} exists; `dcq gallery add {out} EMB` adds to it, --overwrite replaces it")
        ensure_writable(out)
        emb, paths, origin = read_embedding_input(args.embeddings, args.model)
        labels = read_labels(args.labels, len(emb)) if args.labels else paths
        g = Gallery.build(emb, labels=labels, fingerprint=origin["fingerprint"], kind=args.index, nlist=args.nlist,
                          nprobe=args.nprobe, hnsw_m=args.hnsw_m, ef_construction=args.ef_construction,
                          ef_search=args.ef_search, pq_m=args.pq_m, k_factor=args.k_factor,
                          preprocessing=origin["preprocessing"], flip=origin["flip"])
        g.save(out)
    params = "".join(f" {k}={v}" for k, v in g.params.items())
    print(f"wrote {out}: {g.count} embeddings ({g.embedding_size}-d), {g.kind} index{params}, "
          f"model {origin['fingerprint'] or 'unknown (no --model: queries cannot be checked against it)'}"
          f"{', labelled' if labels is not None else ''}")
    return 0


def _add(args) -> int:
    from dcq.deploy.gallery import Gallery

    path = Path(args.gallery)
    if not path.is_file():
        raise DcqError(f"{path}: no gallery file; make one with `dcq gallery build EMB --out {path}`")
    with lock_gallery(path):  # read, add and replace under the lock: no other add can slip in between
        g = Gallery.load(path)
        emb, paths, origin = read_embedding_input(args.embeddings, args.model)
        labels = read_labels(args.labels, len(emb)) if args.labels else (paths if g.labels is not None else None)
        before = g.count
        g.add(emb, labels, origin["fingerprint"], origin["preprocessing"], origin["flip"])
        g.save(path)
    print(f"added rows {before}..{g.count - 1} to {args.gallery} ({g.count} embeddings)")
    return 0


def _queries(args, gallery) -> tuple[np.ndarray, list[str] | None, dict]:
    if args.onnx is None:
        if args.detect or args.landmarks:
            raise DcqError("--detect and --landmarks embed query photos: give the model with --onnx MODEL")
        if len(args.queries) != 1:
            raise DcqError("give one query embedding file or folder, or image files with --onnx MODEL")
        return read_embedding_input(args.queries[0], args.model)
    from dcq.deploy.embed_cli import detected_landmarks, landmark_lookup, open_embedder
    from dcq.deploy.metadata import preprocessing_record
    from dcq.deploy.photos import BadImage, load_crop
    from dcq.data.folder import collect_images

    lookup = landmark_lookup(args.landmarks, args.queries)
    if args.detect:
        lookup = detected_landmarks(args.landmarks)[0]
    files = collect_images(args.queries)
    embedder = open_embedder(args.onnx)
    origin = {"fingerprint": embedder.fingerprint, "preprocessing": preprocessing_record(embedder.preprocessing),
              "flip": not args.no_flip}
    gallery.check_model(embedder.embedding_size, embedder.fingerprint, f"embeddings of {args.onnx}",
                        origin["preprocessing"], origin["flip"])
    crops, names = [], []
    for f in files:
        try:
            crops.append(load_crop(f, embedder.image_size, lookup(f) if lookup else None))
            names.append(str(f))
        except BadImage as exc:
            print(f"skipped {printable(f)}: {exc}", file=sys.stderr)
    if not crops:
        raise DcqError("none of the query images could be embedded (see the lines above)")
    if args.batch_size < 1:
        raise DcqError(f"--batch-size must be >= 1, got {args.batch_size}")
    emb = np.concatenate([embedder.embed(np.stack(crops[i:i + args.batch_size]), flip=not args.no_flip)
                          for i in range(0, len(crops), args.batch_size)])
    return emb, names, origin


def _search(args) -> int:
    from dcq.deploy.gallery import Gallery

    if args.json:
        ensure_writable(args.json)
    g = Gallery.load(args.gallery)
    queries, names, origin = _queries(args, g)
    ids, scores = g.search(queries, args.k, fingerprint=origin["fingerprint"], nprobe=args.nprobe,
                           ef_search=args.ef_search, k_factor=args.k_factor, preprocessing=origin["preprocessing"],
                           flip=origin["flip"])
    result = {"ids": ids.tolist(), "scores": [[round(float(s), 6) for s in row] for row in scores]}
    if g.labels is not None:
        result["labels"] = [[g.labels[i] if i >= 0 else None for i in row] for row in ids.tolist()]
    if names is not None:
        result["queries"] = names
    if args.k > g.count:
        print(f"note: the gallery holds {g.count} embeddings; -k {args.k} gives {g.count} each", file=sys.stderr)
    for q in range(min(len(ids), 10)):
        who = printable(names[q]) if names is not None else f"query {q}"
        hits = ", ".join(f"{printable(result['labels'][q][j]) if 'labels' in result else ids[q, j]} "
                         f"({scores[q, j]:.3f})"
                         for j in range(min(3, ids.shape[1])))
        print(f"{who}: {hits}")
    if len(ids) > 10:
        print(f"... {len(ids) - 10} more queries")
    if args.json:
        write_json(args.json, result, indent=None)
        print(f"wrote {args.json} ({len(ids)} queries x {ids.shape[1]} neighbours)")
    return 0


def run_gallery(args: argparse.Namespace) -> int:
    return {"build": _build, "add": _add, "search": _search}[args.gallery_command](args)
