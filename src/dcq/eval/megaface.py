"""MegaFace challenge 1 identification: rank-1 and CMC against 10 ... 1M distractors.

The challenge's rule, on a probe set of identities with several images each (FaceScrub in the
challenge) and a set of distractor images of nobody in it:

- for every identity and every one of its images g, g takes its turn as the **only** gallery image of
  that identity; each other image p of the identity is a probe, searched among {g} + the first N
  distractors;
- the probe's rank = 1 + the number of distractors scoring ``>=`` its score with g (ties count
  against the probe, as in `dcq.eval.identification`); rank-1 = the fraction of (g, p) pairs with
  rank 1, and the CMC curve the fraction with rank <= k;
- scores are cosine similarities of L2-normalised embeddings; N runs over 10, 100, ... up to the
  number of distractors given, and a set of N distractors is the first N rows of the distractor
  file(s) (so the sets are nested, as in the challenge).

**Fast path**: a distractor set of ``INDEX_MIN_ROWS`` rows or more (1M in the challenge) is searched
through the gallery's faiss index (`dcq.deploy.gallery.Gallery`, IVF by default) when faiss is
installed: each probe's ``index_k`` best distractors are retrieved and a pair's rank counts those
scoring ``>=`` its gallery score, so the CMC is reported up to rank ``index_k`` (``None`` beyond).
The result's ``"search"`` entry says, per distractor-set size, which search ran and, for an index,
its recall of the exact top ``index_k`` on a sample of probes (`dcq.deploy.gallery.exact_search`).

Identities with a single image give no pair and are skipped. `dcq.eval.identification.match_ranks`
ranks each probe against one fixed gallery; here every probe has as many galleries as its identity
has other images, so the distractor scores of each probe are computed once and compared with all its
gallery scores at the same time: for each probe, its gallery scores are sorted and every distractor
score is located among them (``searchsorted``), which counts the distractors at or above each gallery
score in one pass. Distractors are read in chunks (a memory-mapped ``.npy`` from `dcq embed` is never
loaded whole); memory beyond the inputs is one probes x chunk score block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dcq.errors import DcqError
from dcq.eval.verification import l2_normalise

__all__ = ["CMC_RANKS", "INDEX_KINDS", "INDEX_MIN_ROWS", "distractor_sizes", "index_counts", "megaface_counts",
           "megaface_identification", "probe_pairs"]

CMC_RANKS = (1, 2, 3, 5, 10, 20, 50, 100, 1000, 10_000, 100_000, 1_000_000)
_SCORE_BLOCK = 1 << 24  # probes x distractor-chunk float32 scores at once (64 MiB)
INDEX_MIN_ROWS = 100_000  # with index="auto", sets of this many distractors or more take the faiss index
INDEX_KINDS = ("auto", "exact", "flat", "ivf", "ivfpq", "hnsw")  # exact: numpy counting, never an index
RECALL_PROBES = 256  # probes whose index top-k is compared with the exact top-k


def distractor_sizes(available: int, sizes: Sequence[int] | None = None) -> list[int]:
    """The distractor-set sizes to report: powers of ten up to ``available`` and ``available``
    itself (or the given ``sizes``, each at most ``available``), ascending, without repeats."""
    available = int(available)
    if available < 1:
        raise DcqError("MegaFace identification needs at least one distractor embedding")
    if sizes is None:
        out = [10 ** k for k in range(1, int(math.log10(available) + 1e-9) + 1)]
        if not out or out[-1] != available:
            out.append(available)
        return out
    out = sorted({int(s) for s in sizes})
    if not out or out[0] < 1:
        raise DcqError(f"distractor set sizes must be >= 1, got {list(sizes)}")
    if out[-1] > available:
        raise DcqError(f"distractor set size {out[-1]} is more than the {available} distractor embeddings given")
    return out


def probe_pairs(labels) -> tuple[np.ndarray, np.ndarray]:
    """(gallery row, probe row) of every ordered pair of distinct images of one identity, grouped by
    probe (all pairs of probe p are contiguous, p ascending)."""
    lab = np.asarray(labels).reshape(-1)
    gal, pro = [], []
    for p in range(len(lab)):
        mates = np.flatnonzero(lab == lab[p])
        mates = mates[mates != p]
        gal.append(mates)
        pro.append(np.full(len(mates), p))
    if not gal:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(gal).astype(np.int64), np.concatenate(pro).astype(np.int64)


def _distractor_blocks(arrays: list, bounds: Sequence[int], chunk: int):
    """(segment j, float32 unit rows) of consecutive blocks covering rows [bounds[0], bounds[-1]) of the
    files read in order; no block crosses a bound, and a block of segment j lies in [bounds[j], bounds[j+1])."""
    row, j = 0, 0
    for arr in arrays:
        s = 0
        while s < len(arr) and j < len(bounds) - 1:
            take = min(chunk, len(arr) - s, bounds[j + 1] - row)
            yield j, l2_normalise(arr[s:s + take])
            row, s = row + take, s + take
            if row == bounds[j + 1]:
                j += 1


def _check_distractors(distractors, dim: int) -> list:
    arrays = list(distractors) if isinstance(distractors, (list, tuple)) else [distractors]
    for k, arr in enumerate(arrays):
        if getattr(arr, "ndim", 0) != 2 or not np.issubdtype(arr.dtype, np.floating):
            raise DcqError(f"distractor file {k + 1}: expected an (N, d) float embedding array, got "
                           f"shape {getattr(arr, 'shape', None)} dtype {getattr(arr, 'dtype', None)}")
        if arr.shape[1] != dim:
            raise DcqError(f"distractor embeddings are {arr.shape[1]}-d but the model's are {dim}-d; embed the "
                           "distractors with the same model (`dcq embed MODEL DIR --out D.npy`)")
    return arrays


def megaface_counts(probe_emb, probe_labels, distractors, sizes: Sequence[int]) -> tuple[np.ndarray, ...]:
    """(gallery rows, probe rows, counts, sizes): ``counts[j, k]`` = distractors among the first
    ``sizes[j]`` scoring >= pair k's gallery score (pair k's rank minus one)."""
    probes = l2_normalise(np.asarray(probe_emb, dtype=np.float32))
    labels = np.asarray(probe_labels).reshape(-1)
    if probes.ndim != 2 or len(labels) != len(probes):
        raise DcqError(f"{len(labels)} probe labels for probe embeddings of shape {probes.shape}")
    arrays = _check_distractors(distractors, probes.shape[1])
    available = sum(len(a) for a in arrays)
    sizes = distractor_sizes(available, sizes)
    gal, pro = probe_pairs(labels)
    if len(gal) == 0:
        raise DcqError("no probe identity has two images; MegaFace identification pairs a gallery image with "
                       "another image of the same identity")
    gallery_score = np.einsum("ij,ij->i", probes[gal], probes[pro]).astype(np.float32)
    # per probe: its pairs (contiguous in `pro`) sorted by gallery score
    starts = np.searchsorted(pro, np.arange(len(probes) + 1))
    order = np.concatenate([starts[p] + np.argsort(gallery_score[starts[p]:starts[p + 1]], kind="stable")
                            for p in range(len(probes))])
    sorted_scores = gallery_score[order]
    active = [p for p in range(len(probes)) if starts[p + 1] > starts[p]]
    counts = np.zeros((len(sizes), len(gal)), dtype=np.int64)
    chunk = max(1, _SCORE_BLOCK // max(1, len(active)))
    p_act = probes[active]
    for j, block in _distractor_blocks(arrays, [0] + sizes, chunk):
        scores = p_act @ block.T  # (active probes, rows)
        for r, p in enumerate(active):
            a, b = starts[p], starts[p + 1]
            # below[i] = gallery scores <= distractor i; distractor i beats sorted pair t iff below[i] > t
            below = np.searchsorted(sorted_scores[a:b], scores[r], side="right")
            hist = np.bincount(below, minlength=b - a + 1)
            counts[j, order[a:b]] += np.cumsum(hist[::-1])[::-1][1:]
    return gal, pro, np.cumsum(counts, axis=0), sizes


def _first_rows(arrays: list, n: int) -> np.ndarray:
    """The first ``n`` distractor rows of the files read in order, as one float32 array."""
    parts, left = [], n
    for arr in arrays:
        if left <= 0:
            break
        parts.append(np.asarray(arr[:left], dtype=np.float32))
        left -= len(parts[-1])
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def index_counts(probe_emb, probe_labels, distractors, size: int, kind: str = "ivf", k: int = 1000,
                 recall_probes: int = RECALL_PROBES) -> tuple[np.ndarray, dict]:
    """(counts, search record) of one distractor-set size through a `Gallery` index of its first
    ``size`` rows: ``counts[i]`` = retrieved distractors scoring >= pair i's gallery score (pair order
    of `probe_pairs`; ``k`` means rank > k); the record holds the recall of the exact top k."""
    from dcq.deploy.gallery import Gallery, exact_search

    probes = l2_normalise(np.asarray(probe_emb, dtype=np.float32))
    labels = np.asarray(probe_labels).reshape(-1)
    arrays = _check_distractors(distractors, probes.shape[1])
    gal, pro = probe_pairs(labels)
    rows = _first_rows(arrays, int(size))
    gallery = Gallery.build(rows, kind=kind)
    k = min(int(k), len(rows))
    active = np.unique(pro)
    _, found = gallery.search(probes[active], k)
    found = np.sort(found, axis=1)  # ascending scores of each active probe's top k
    slot = np.searchsorted(active, pro)
    gallery_score = np.einsum("ij,ij->i", probes[gal], probes[pro]).astype(np.float32)
    counts = np.array([k - np.searchsorted(found[r], s, side="left") for r, s in zip(slot, gallery_score)],
                      dtype=np.int64)
    sample = active[np.unique(np.linspace(0, len(active) - 1, min(len(active), recall_probes)).astype(int))]
    approx, _ = gallery.search(probes[sample], k)
    exact, _ = exact_search(probes[sample], rows, k)
    recall = float(np.mean([len(np.intersect1d(a, e)) / k for a, e in zip(approx, exact)]))
    record = {"distractors": int(size), "search": f"faiss {kind} index", "params": gallery.params, "k": int(k),
              "recall_at_k": recall, "recall_probes": int(len(sample))}
    return counts, record


def _uses_index(index: str, size: int) -> bool:
    if index not in INDEX_KINDS:
        raise DcqError(f"--megaface-index {index}: choose one of {', '.join(INDEX_KINDS)}")
    if index == "exact":
        return False
    if index == "auto":
        from dcq.deploy.gallery import have_faiss

        return size >= INDEX_MIN_ROWS and have_faiss()
    return True


def megaface_identification(probe_emb, probe_labels, distractors, sizes: Sequence[int] | None = None,
                            cmc_ranks: Sequence[int] = CMC_RANKS, index: str = "auto", index_k: int = 1000) -> dict:
    """The ``dcq eval --json`` ``"megaface"`` entry: rank-1 and CMC at each distractor-set size.

    ``index``: "auto" (a faiss IVF index for sets of ``INDEX_MIN_ROWS`` or more when faiss is
    installed, exact counting otherwise), "exact", or a `Gallery` kind for every size."""
    arrays = list(distractors) if isinstance(distractors, (list, tuple)) else [distractors]
    sizes = distractor_sizes(sum(len(a) for a in arrays), sizes)
    exact_sizes = [s for s in sizes if not _uses_index(index, s)]
    per_size, search = {}, []
    if exact_sizes:
        gal, pro, counts, _ = megaface_counts(probe_emb, probe_labels, arrays, exact_sizes)
        per_size.update({s: (c, None) for s, c in zip(exact_sizes, counts)})
        search += [{"distractors": int(s), "search": "exact"} for s in exact_sizes]
    for s in sizes:
        if s not in per_size:
            kind = "ivf" if index == "auto" else index
            counts, record = index_counts(probe_emb, probe_labels, arrays, s, kind, index_k)
            per_size[s] = (counts, record["k"] if record["k"] < s else None)  # k = s: every rank is known
            search.append(record)
    gal, pro = probe_pairs(np.asarray(probe_labels).reshape(-1))
    ranks = [int(k) for k in cmc_ranks if int(k) <= sizes[-1] + 1]
    labels = np.asarray(probe_labels).reshape(-1)

    def cmc(c, k_max):
        return [float(np.mean(c < k)) if k_max is None or k <= k_max else None for k in ranks]

    return {
        "distractors": [int(s) for s in sizes],
        "rank1": [float(np.mean(per_size[s][0] == 0)) for s in sizes],
        "cmc_ranks": ranks,
        "cmc": [cmc(*per_size[s]) for s in sizes],
        "search": sorted(search, key=lambda r: r["distractors"]),
        "probe_images": int(len(labels)),
        "probe_identities": int(len(np.unique(labels[pro]))),
        "pairs": int(len(gal)),
    }


def embed_probe_folder(model, root, batch_size: int = 256, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and labels of an aligned probe set ``root/<identity>/<image>`` (or ``root/probes/...``,
    the layout `dcq synth --profile megaface` writes), resized to the model's input size."""
    from pathlib import Path

    from dcq.data.folder import ImageFolderDataset

    root = Path(root)
    if (root / "probes").is_dir():
        root = root / "probes"
    probes = ImageFolderDataset(root)
    size = int(model.image_size)
    out = None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(probes), desc="megaface probes", unit="img", dynamic_ncols=True)
    for s in range(0, len(probes), batch_size):
        idx = range(s, min(len(probes), s + batch_size))
        e = model.embed(np.stack([probes.image(i, size) for i in idx]))
        if out is None:
            out = np.empty((len(probes), e.shape[1]), dtype=np.float32)
        out[s:idx.stop] = e
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return out, probes.labels


def megaface_table(result: dict) -> str:
    from dcq.tables import fmt_metric, markdown_table

    ranks = result["cmc_ranks"]
    shown = [k for k in ranks if k in (1, 5, 10, 100)]
    rows = [[str(n)] + [fmt_metric(curve[ranks.index(k)]) for k in shown]
            for n, curve in zip(result["distractors"], result["cmc"])]
    return markdown_table(["distractors"] + [f"rank-{k}" for k in shown], rows)
