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

__all__ = ["CMC_RANKS", "distractor_sizes", "megaface_counts", "megaface_identification", "probe_pairs"]

CMC_RANKS = (1, 2, 3, 5, 10, 20, 50, 100, 1000, 10_000, 100_000, 1_000_000)
_SCORE_BLOCK = 1 << 24  # probes x distractor-chunk float32 scores at once (64 MiB)


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


def megaface_identification(probe_emb, probe_labels, distractors, sizes: Sequence[int] | None = None,
                            cmc_ranks: Sequence[int] = CMC_RANKS) -> dict:
    """The ``dcq eval --json`` ``"megaface"`` entry: rank-1 and CMC at each distractor-set size."""
    gal, pro, counts, sizes = megaface_counts(probe_emb, probe_labels, distractors, sizes)
    ranks = [int(k) for k in cmc_ranks if int(k) <= sizes[-1] + 1]
    labels = np.asarray(probe_labels).reshape(-1)
    return {
        "distractors": [int(s) for s in sizes],
        "rank1": [float(np.mean(c == 0)) for c in counts],
        "cmc_ranks": ranks,
        "cmc": [[float(np.mean(c < k)) for k in ranks] for c in counts],
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
