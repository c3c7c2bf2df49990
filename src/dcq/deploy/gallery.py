"""A gallery: enrolled face embeddings, searched by cosine similarity.

Every vector (enrolled or query) is L2-normalised, so the inner product is the cosine the model
was trained for. Three kinds:

- ``flat``: exact search. With faiss (the ``gallery`` extra) an ``IndexFlatIP``; without it a
  blocked numpy matrix product over the memory-mapped rows. Both return the exact top k.
- ``ivf``: faiss ``IndexIVFFlat``: k-means cells, a query scans its ``nprobe`` nearest cells.
- ``ivfpq``: the same cells holding 4-bit product-quantised codes (d/8 bytes a row at the default
  ``pq_m`` = d/4) scanned with SIMD (faiss fast scan); the ``k_factor`` x k best are then re-ranked
  with the exact vectors (``IndexRefineFlat``). The fastest at a high recall in the benchmark.
- ``hnsw``: faiss ``IndexHNSWFlat``: a navigable small-world graph, ``ef_search`` candidates.

The approximate kinds trade recall for speed; `benchmarks/gallery_speed.py` measures both (see
docs/results.md, "Gallery search"). Row ids are the order of enrolment, across additions. The
file keeps the embedding size, the fingerprint of the model, the preprocessing it was fed with
(colour order, mean, std) and whether the flip test was used, and a query made otherwise is
refused: its similarities to the gallery would mean nothing.
"""

from __future__ import annotations

import json
import math

import numpy as np

from dcq.deploy.gallery_store import damaged, read_store, write_store
from dcq.errors import DcqError

KINDS = ("flat", "ivf", "ivfpq", "hnsw")
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


def _positive(**values) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise DcqError(f"--{name.replace('_', '-')} {value}: give 1 or more")


def default_nlist(n: int) -> int:
    """IVF cells: about 4 sqrt(N), at least 39 training points per cell (faiss's minimum advice)."""
    return int(max(1, min(round(4 * math.sqrt(n)), n // 39)))


def ivfpq_base(faiss, d: int, nlist: int, pq_m: int):
    """IVF cells of 4-bit PQ codes, scanned with SIMD: the first stage of an ``ivfpq`` gallery."""
    if pq_m < 1 or d % pq_m or pq_m % 2:
        raise DcqError(f"--pq-m {pq_m}: give an even number that divides the embedding size {d} (d/4 = {d // 4} "
                       "is the default)")
    return faiss.IndexIVFPQFastScan(faiss.IndexFlatIP(d), d, nlist, pq_m, 4, faiss.METRIC_INNER_PRODUCT)


def train_ivf(index, x: np.ndarray, nlist: int, seed: int = 0) -> None:
    """k-means cells (and PQ codebooks) on a seeded sample of 64 rows per cell (plenty for k-means)."""
    train = x
    if len(x) > 64 * nlist:
        train = x[np.sort(np.random.default_rng(seed).choice(len(x), 64 * nlist, replace=False))]
    index.cp.seed = seed
    index.train(train)


def checked_nlist(nlist: int | None, n: int) -> int:
    nlist = default_nlist(n) if nlist is None else int(nlist)
    if not 1 <= nlist <= n:
        raise DcqError(f"--nlist {nlist}: give 1 to {n} cells (the number of embeddings); "
                       f"about 4 sqrt(N) = {default_nlist(n)} is usual")
    return nlist


class Gallery:
    """Enrolled embeddings and their index. Make one with `build`, open one with `load`."""

    def __init__(self, kind: str, embedding_size: int, fingerprint: str | None, params: dict,
                 labels: list[str] | None, vectors: np.ndarray | None = None, index=None, count: int = 0,
                 preprocessing: dict | None = None, flip: bool | None = None):
        self.kind, self.embedding_size, self.fingerprint = kind, int(embedding_size), fingerprint
        self.params, self.labels, self.vectors, self.index = dict(params), labels, vectors, index
        self.count = int(count)
        self.preprocessing, self.flip = preprocessing, flip  # None: not known (an .npy without --model)
        self._flat = None  # the faiss IndexFlatIP of a flat gallery, made on first search
        self._parts: list = []  # faiss objects a wrapper index points to, kept alive with it

    # ------------------------------------------------------------------ making
    @classmethod
    def build(cls, emb, labels: list[str] | None = None, fingerprint: str | None = None, kind: str = "flat",
              nlist: int | None = None, nprobe: int = 64, hnsw_m: int = 32, ef_construction: int = 80,
              ef_search: int = 128, pq_m: int | None = None, k_factor: int = 100, seed: int = 0,
              preprocessing: dict | None = None, flip: bool | None = None) -> Gallery:
        if kind not in KINDS:
            raise DcqError(f"--index {kind}: choose one of {', '.join(KINDS)}")
        _positive(nprobe=nprobe, hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search=ef_search,
                  k_factor=k_factor)
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
                nlist = checked_nlist(nlist, len(x))
                index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
                train_ivf(index, x, nlist, seed)
                params = {"nlist": nlist, "nprobe": int(nprobe)}
            elif kind == "ivfpq":
                if len(x) < 256:  # 16 centroids per sub-quantiser need more rows than that to train
                    raise DcqError(f"--index ivfpq needs at least 256 embeddings to train its codes, got {len(x)}; "
                                   "use --index flat (exact) for a small gallery")
                nlist = checked_nlist(nlist, len(x))
                pq_m = d // 4 if pq_m is None else int(pq_m)
                base = ivfpq_base(faiss, d, nlist, pq_m)
                train_ivf(base, x, nlist, seed)
                index = faiss.IndexRefineFlat(base)
                index.own_fields = False  # `base` stays Python's: kept on the gallery below
                params = {"nlist": nlist, "nprobe": int(nprobe), "pq_m": pq_m, "k_factor": int(k_factor)}
            else:
                index = faiss.IndexHNSWFlat(d, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
                index.hnsw.efConstruction = int(ef_construction)
                params = {"hnsw_m": int(hnsw_m), "ef_construction": int(ef_construction),
                          "ef_search": int(ef_search)}
            g = cls(kind, d, fingerprint, params, None, index=index)
            g._parts = [base] if kind == "ivfpq" else []
        g.labels = [] if labels is not None else None
        g.preprocessing, g.flip = preprocessing, flip
        g.add(x, labels, fingerprint, preprocessing, flip)
        return g

    def add(self, emb, labels: list[str] | None = None, fingerprint: str | None = None,
            preprocessing: dict | None = None, flip: bool | None = None) -> None:
        """Enrol more rows (ids continue after the last one)."""
        x = unit_rows(emb, "added embeddings")
        self.check_model(x.shape[1], fingerprint, "the added embeddings", preprocessing, flip)
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

    def check_model(self, d: int, fingerprint: str | None, what: str, preprocessing: dict | None = None,
                    flip: bool | None = None) -> None:
        """Refuse embeddings of another size, from another model, or made with other preprocessing
        or flip setting than the gallery's (each checked where both sides know it)."""
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
        if preprocessing is not None and self.preprocessing is not None and preprocessing != self.preprocessing:
            raise DcqError(f"{what} were made with preprocessing {_shown(preprocessing)}, the gallery with "
                           f"{_shown(self.preprocessing)} (the model's dcq.* metadata differs); embed them with "
                           "the model file the gallery was built with")
        if flip is not None and self.flip is not None and flip != self.flip:
            raise DcqError(f"{what} were made {'with' if flip else 'without'} the flip test, the gallery "
                           f"{'with' if self.flip else 'without'} it; embed them "
                           f"{'without --no-flip' if self.flip else 'with --no-flip'}")

    # ------------------------------------------------------------------ searching
    def search(self, queries, k: int = 10, fingerprint: str | None = None, nprobe: int | None = None,
               ef_search: int | None = None, engine: str = "auto", k_factor: int | None = None,
               preprocessing: dict | None = None, flip: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores), each (Q, min(k, count)), best first. ``engine`` (flat only): auto (faiss
        when installed), faiss or numpy."""
        if k < 1:
            raise DcqError(f"-k {k}: ask for 1 or more neighbours")
        _positive(nprobe=nprobe, ef_search=ef_search, k_factor=k_factor)
        q = unit_rows(queries, "queries")
        self.check_model(q.shape[1], fingerprint, "the queries", preprocessing, flip)
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
        elif self.kind == "ivfpq":
            import faiss

            faiss.downcast_index(self.index.base_index).nprobe = int(nprobe or self.params["nprobe"])
            self.index.k_factor = float(k_factor or self.params["k_factor"])
            scores, ids = self.index.search(q, k)
        else:
            self.index.hnsw.efSearch = max(int(ef_search or self.params["ef_search"]), k)
            scores, ids = self.index.search(q, k)
        return ids.astype(np.int64), scores.astype(np.float32)

    # ------------------------------------------------------------------ file
    def save(self, path) -> None:
        header = {"format": FORMAT, "kind": self.kind, "embedding_size": self.embedding_size,
                  "fingerprint": self.fingerprint, "count": self.count, "params": self.params,
                  "preprocessing": self.preprocessing, "flip": self.flip,
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
        """The gallery in file ``path``; its digest and header (count, shapes, dtypes) checked."""
        header, arrays = read_store(path)
        if header.get("format") != FORMAT or header.get("kind") not in KINDS:
            raise DcqError(f"{path}: gallery format {_shown(header.get('format'))} / kind "
                           f"{_shown(header.get('kind'))} is not one this dcq reads; build it again")
        kind, d, count = header["kind"], header.get("embedding_size"), header.get("count")
        if type(d) is not int or type(count) is not int or d < 1 or count < 0 or not isinstance(
                header.get("params", {}), dict) or not isinstance(header.get("fingerprint"), (str, type(None))):
            raise damaged(path, "its header's embedding_size, count, params or fingerprint")
        labels = None
        if header.get("labels"):
            try:
                labels = json.loads(bytes(arrays["labels"]).decode())
            except (KeyError, UnicodeDecodeError, ValueError, RecursionError):
                labels = None
            if not isinstance(labels, list) or not all(isinstance(v, str) for v in labels):
                raise damaged(path, "its labels")
        vectors, index = None, None
        if kind == "flat":
            vectors = arrays.get("vectors")
            if vectors is None or vectors.dtype != np.float32 or vectors.shape != (count, d):
                have = "none" if vectors is None else f"{vectors.dtype} {vectors.shape}"
                raise damaged(path, f"the header says {count} x {d} float32 vectors, the file holds {have}")
        else:
            faiss = load_faiss(f"{path} (an {kind} gallery)")
            try:
                index = faiss.deserialize_index(np.array(arrays["index"]))
            except (KeyError, RuntimeError, ValueError) as exc:
                raise damaged(path, f"its faiss index cannot be read: {str(exc).splitlines()[0][:100]}") from None
            if index.ntotal != count or index.d != d:
                raise damaged(path, f"the header says {count} x {d}, its index holds {index.ntotal} x {index.d}")
        g = cls(kind, d, header.get("fingerprint"), header.get("params", {}), labels, vectors=vectors, index=index,
                count=count, preprocessing=header.get("preprocessing"), flip=header.get("flip"))
        if labels is not None and len(labels) != g.count:
            raise DcqError(f"{path}: {len(labels)} labels for {g.count} rows; build the gallery again")
        return g


def _shown(value) -> str:
    """A header or preprocessing value for a message, cut short."""
    return repr(value)[:160]
