"""A gallery: enrolled face embeddings, searched by cosine similarity.

Every vector (enrolled or query) is L2-normalised, so the inner product is the cosine the model
was trained for. Three kinds:

- ``flat``: exact search. With faiss (the ``gallery`` extra) an ``IndexFlatIP``; without it a
  blocked numpy matrix product over the memory-mapped rows. Both return the exact top k.
- ``ivf``: faiss ``IndexIVFFlat``: k-means cells, a query scans its ``nprobe`` nearest cells.
- ``hnsw``: faiss ``IndexHNSWFlat``: a navigable small-world graph, ``ef_search`` candidates.

The approximate kinds trade recall for speed; `benchmarks/gallery_speed.py` measures both (see
docs/results.md, "Gallery search"). Row ids are the order of enrolment, across additions. The
file keeps the embedding size and the fingerprint of the model, and a query from another model
is refused: its similarities to the gallery would mean nothing.
"""

from __future__ import annotations

import json
import math

import numpy as np

from dcq.deploy.gallery_store import read_store, write_store
from dcq.errors import DcqError

KINDS = ("flat", "ivf", "hnsw")
FORMAT = 1
FAISS_HINT = "install faiss-cpu (pip install 'dcq[gallery]')"


def load_faiss(why: str):
    """The faiss module, or one `DcqError` line saying what needs it and how to get it."""
    try:
        import faiss
    except ImportError:
        raise DcqError(f"{why} needs faiss: {FAISS_HINT}; exact search (--index flat) works without it") from None
    return faiss


def have_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def unit_rows(emb, what: str) -> np.ndarray:
    """``emb`` as C-contiguous float32 (N, d) rows of norm 1; NaN, Inf and zero rows are refused."""
    a = np.asarray(emb)
    if a.ndim != 2 or a.shape[1] < 1 or not np.issubdtype(a.dtype, np.floating):
        raise DcqError(f"{what}: expected an (N, d) float array of embeddings, got {a.dtype} {a.shape}")
    out = None if a.dtype == np.float32 and a.flags.c_contiguous else np.empty(a.shape, dtype=np.float32)
    for start in range(0, len(a), 1 << 16):  # blockwise, so a memory-mapped input is read once
        block = np.asarray(a[start:start + (1 << 16)], dtype=np.float64)
        norms = np.linalg.norm(block, axis=1)
        bad = ~np.isfinite(norms) | (norms < 1e-12)
        if bad.any():
            row = start + int(np.flatnonzero(bad)[0])
            raise DcqError(f"{what}: row {row} is NaN, Inf or zero; re-create the embeddings with `dcq embed`")
        if out is None and np.abs(norms - 1).max() > 1e-5:  # not unit rows after all: copy what was checked
            out = np.empty(a.shape, dtype=np.float32)
            out[:start] = a[:start]
        if out is not None:
            out[start:start + len(block)] = block / norms[:, None]
    return a if out is None else out  # unit float32 rows are used as they are (no copy of a large gallery)


def _top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if scores.shape[1] > k:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores, ids = np.take_along_axis(scores, part, 1), np.take_along_axis(ids, part, 1)
    return scores, ids


def exact_search(queries: np.ndarray, vectors: np.ndarray, k: int, block: int = 65536):
    """Exact top-k inner products of unit ``queries`` against ``vectors`` with numpy, best first.

    The gallery is scanned in blocks of rows (memory: queries x block scores). After the first
    block only the scores above each query's current k-th best are kept and merged, so the cost
    is the matrix product, not a selection over every score. Equal scores are listed lower row first.
    """
    q = np.asarray(queries, dtype=np.float32)
    n, nq = len(vectors), len(q)
    k = min(k, n)
    first = min(n, max(k, 4096))
    s = q @ np.asarray(vectors[:first], dtype=np.float32).T
    best_s, best_i = _top_k(s, np.broadcast_to(np.arange(first, dtype=np.int64), s.shape), k)
    for start in range(first, n, block):
        s = q @ np.asarray(vectors[start:start + block], dtype=np.float32).T
        rows, cols = np.nonzero(s > best_s.min(axis=1)[:, None])
        if len(rows) == 0:
            continue
        counts = np.bincount(rows, minlength=nq)
        slot = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)  # position within its row
        width = int(counts.max())
        cand_s = np.full((nq, width), -np.inf, dtype=np.float32)
        cand_i = np.full((nq, width), n, dtype=np.int64)
        cand_s[rows, slot] = s[rows, cols]
        cand_i[rows, slot] = start + cols
        best_s, best_i = _top_k(np.concatenate([best_s, cand_s], 1), np.concatenate([best_i, cand_i], 1), k)
    order = np.lexsort((best_i, -best_s), axis=1)
    return np.take_along_axis(best_i, order, 1), np.take_along_axis(best_s, order, 1)


def default_nlist(n: int) -> int:
    """IVF cells: about 4 sqrt(N), at least 39 training points per cell (faiss's minimum advice)."""
    return int(max(1, min(round(4 * math.sqrt(n)), n // 39)))


class Gallery:
    """Enrolled embeddings and their index. Make one with `build`, open one with `load`."""

    def __init__(self, kind: str, embedding_size: int, fingerprint: str | None, params: dict,
                 labels: list[str] | None, vectors: np.ndarray | None = None, index=None, count: int = 0):
        self.kind, self.embedding_size, self.fingerprint = kind, int(embedding_size), fingerprint
        self.params, self.labels, self.vectors, self.index = dict(params), labels, vectors, index
        self.count = int(count)
        self._flat = None  # the faiss IndexFlatIP of a flat gallery, made on first search

    # ------------------------------------------------------------------ making
    @classmethod
    def build(cls, emb, labels: list[str] | None = None, fingerprint: str | None = None, kind: str = "flat",
              nlist: int | None = None, nprobe: int = 32, hnsw_m: int = 32, ef_construction: int = 80,
              ef_search: int = 128, seed: int = 0) -> Gallery:
        if kind not in KINDS:
            raise DcqError(f"--index {kind}: choose one of {', '.join(KINDS)}")
        x = unit_rows(emb, "gallery embeddings")
        if len(x) == 0:
            raise DcqError("gallery embeddings: no rows to enrol")
        d = x.shape[1]
        params: dict = {}
        if kind == "flat":
            g = cls(kind, d, fingerprint, params, None, vectors=np.empty((0, d), dtype=np.float32))
        else:
            faiss = load_faiss(f"--index {kind}")
            if kind == "ivf":
                nlist = default_nlist(len(x)) if nlist is None else int(nlist)
                if not 1 <= nlist <= len(x):
                    raise DcqError(f"--nlist {nlist}: give 1 to {len(x)} cells (the number of embeddings); "
                                   f"about 4 sqrt(N) = {default_nlist(len(x))} is usual")
                index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
                train = x
                if len(x) > 64 * nlist:  # k-means on a seeded sample: 64 points per cell is plenty
                    train = x[np.sort(np.random.default_rng(seed).choice(len(x), 64 * nlist, replace=False))]
                index.cp.seed = seed
                index.train(train)
                params = {"nlist": nlist, "nprobe": int(nprobe)}
            else:
                index = faiss.IndexHNSWFlat(d, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
                index.hnsw.efConstruction = int(ef_construction)
                params = {"hnsw_m": int(hnsw_m), "ef_construction": int(ef_construction),
                          "ef_search": int(ef_search)}
            g = cls(kind, d, fingerprint, params, None, index=index)
        g.labels = [] if labels is not None else None
        g.add(x, labels, fingerprint)
        return g

    def add(self, emb, labels: list[str] | None = None, fingerprint: str | None = None) -> None:
        """Enrol more rows (ids continue after the last one)."""
        x = unit_rows(emb, "added embeddings")
        self.check_model(x.shape[1], fingerprint, "the added embeddings")
        if (labels is None) != (self.labels is None):
            have = "has labels: give --labels for the added rows" if self.labels is not None else \
                "has no labels: add rows without --labels"
            raise DcqError(f"the gallery {have}")
        if labels is not None and len(labels) != len(x):
            raise DcqError(f"--labels: {len(labels)} labels for {len(x)} embeddings")
        if self.kind == "flat":
            self.vectors = np.concatenate([self.vectors, x]) if len(self.vectors) else x
            self._flat = None
        else:
            self.index.add(x)
        if labels is not None:
            self.labels += [str(v) for v in labels]
        self.count += len(x)

    def check_model(self, d: int, fingerprint: str | None, what: str) -> None:
        """Refuse embeddings of another size or from another model than the gallery's."""
        if d != self.embedding_size:
            raise DcqError(f"{what} are {d}-d, the gallery's are {self.embedding_size}-d: they come from another "
                           "model; embed them with the gallery's model")
        if self.fingerprint is None:
            return
        if fingerprint is None:
            raise DcqError(f"{what} carry no model fingerprint and the gallery was made with model "
                           f"{self.fingerprint}; pass --model MODEL.onnx (the model they were embedded with) or "
                           "embed them with `dcq embed --onnx`")
        if fingerprint != self.fingerprint:
            raise DcqError(f"{what} come from model {fingerprint}, the gallery from model {self.fingerprint}; "
                           "embed them with the gallery's model")

    # ------------------------------------------------------------------ searching
    def search(self, queries, k: int = 10, fingerprint: str | None = None, nprobe: int | None = None,
               ef_search: int | None = None, engine: str = "auto") -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores), each (Q, min(k, count)), best first. ``engine`` (flat only): auto (faiss
        when installed), faiss or numpy."""
        if k < 1:
            raise DcqError(f"-k {k}: ask for 1 or more neighbours")
        q = unit_rows(queries, "queries")
        self.check_model(q.shape[1], fingerprint, "the queries")
        k = min(int(k), self.count)
        if self.kind == "flat":
            if engine == "numpy" or (engine == "auto" and not have_faiss()):
                return exact_search(q, self.vectors, k)
            if self._flat is None:
                faiss = load_faiss("faiss flat search")
                self._flat = faiss.IndexFlatIP(self.embedding_size)
                self._flat.add(np.ascontiguousarray(self.vectors, dtype=np.float32))
            scores, ids = self._flat.search(q, k)
        elif self.kind == "ivf":
            self.index.nprobe = int(nprobe or self.params["nprobe"])
            scores, ids = self.index.search(q, k)
        else:
            self.index.hnsw.efSearch = max(int(ef_search or self.params["ef_search"]), k)
            scores, ids = self.index.search(q, k)
        return ids.astype(np.int64), scores.astype(np.float32)

    # ------------------------------------------------------------------ file
    def save(self, path) -> None:
        header = {"format": FORMAT, "kind": self.kind, "embedding_size": self.embedding_size,
                  "fingerprint": self.fingerprint, "count": self.count, "params": self.params,
                  "metric": "inner product of L2-normalised embeddings (cosine)", "labels": self.labels is not None}
        arrays = {}
        if self.kind == "flat":
            arrays["vectors"] = self.vectors
        else:
            faiss = load_faiss(f"a {self.kind} gallery")
            arrays["index"] = faiss.serialize_index(self.index)
        if self.labels is not None:
            arrays["labels"] = np.frombuffer(json.dumps(self.labels).encode(), dtype=np.uint8)
        write_store(path, header, arrays)

    @classmethod
    def load(cls, path) -> Gallery:
        header, arrays = read_store(path)
        if header.get("format") != FORMAT or header.get("kind") not in KINDS:
            raise DcqError(f"{path}: gallery format {header.get('format')!r} / kind {header.get('kind')!r} is not "
                           "one this dcq reads; build it again")
        labels = json.loads(bytes(arrays["labels"]).decode()) if header.get("labels") else None
        kind = header["kind"]
        vectors, index = None, None
        if kind == "flat":
            vectors = arrays["vectors"]
        else:
            faiss = load_faiss(f"{path} (an {kind} gallery)")
            index = faiss.deserialize_index(np.array(arrays["index"]))
        g = cls(kind, header["embedding_size"], header.get("fingerprint"), header.get("params", {}), labels,
                vectors=vectors, index=index, count=header["count"])
        if labels is not None and len(labels) != g.count:
            raise DcqError(f"{path}: {len(labels)} labels for {g.count} rows; build the gallery again")
        return g
