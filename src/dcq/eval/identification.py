"""MegaFace-style closed-set identification: rank-k of probes against a gallery plus distractors.

For each probe, its *true match score* is its best cosine similarity to a gallery item of its own
identity. Its rank is 1 + the number of *other* items — gallery items of other identities and
all distractors — scoring at least as high (ties count against the probe: an impostor that
scores exactly the true match score is ranked above it). A probe is a rank-k hit when its rank is
<= k. Every probe's identity must appear in the gallery.

The score matrix probes x (gallery + distractors) is never built: gallery and distractors are
streamed in row chunks against blocks of probes, and only the true match scores and a per-probe
count of items beating them are kept. Memory beyond the inputs is about
``probe_block x chunk_size`` floats, whatever the number of distractors (1M x 512 distractors can
be a ``np.load(..., mmap_mode="r")`` array and are read one chunk at a time).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dcq.errors import DcqError
from dcq.eval.verification import l2_normalise

__all__ = ["identify", "match_ranks"]

DEFAULT_CHUNK = 16384
_BLOCK_FLOATS = 1 << 23  # probe_block x chunk scores per block: 32 MiB of float32


def _as_2d(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):  # keep memmaps as they are: they are read chunk by chunk
        x = np.asarray(x)
    if x.ndim != 2:
        raise DcqError(f"{name} must be a 2-D (n, d) embedding array, got shape {x.shape}")
    return x


def match_ranks(probe_emb, probe_labels, gallery_emb, gallery_labels, distractor_emb=None,
                chunk_size: int = DEFAULT_CHUNK) -> np.ndarray:
    """Per-probe rank (1-based, int64) of its true match among gallery + distractors (module docstring)."""
    probes = _as_2d(probe_emb, "probe embeddings")
    gallery = _as_2d(gallery_emb, "gallery embeddings")
    p_lab = np.asarray(probe_labels).reshape(-1).astype(np.int64)
    g_lab = np.asarray(gallery_labels).reshape(-1).astype(np.int64)
    if len(p_lab) != len(probes) or len(g_lab) != len(gallery):
        raise DcqError(f"labels do not match embeddings: {len(probes)} probes / {len(p_lab)} labels, "
                       f"{len(gallery)} gallery items / {len(g_lab)} labels")
    dims = {probes.shape[1], gallery.shape[1]}
    distractors = None
    if distractor_emb is not None:
        distractors = _as_2d(distractor_emb, "distractor embeddings")
        dims.add(distractors.shape[1])
    if len(dims) > 1:
        raise DcqError(f"embedding sizes differ between probes, gallery and distractors: {sorted(dims)}")
    missing = np.setdiff1d(p_lab, g_lab)
    if missing.size:
        raise DcqError(f"{missing.size} probe identities (e.g. {int(missing[0])}) have no gallery item; "
                       "closed-set identification needs every probe identity in the gallery")
    chunk_size = max(1, int(chunk_size))
    n = len(probes)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    block = max(1, min(n, _BLOCK_FLOATS // chunk_size))
    ranks = np.empty(n, dtype=np.int64)
    for p0 in range(0, n, block):
        p = l2_normalise(probes[p0:p0 + block])
        lab = p_lab[p0:p0 + block]
        # pass 1: true match score = best score against the probe's own identity
        best = np.full(len(p), -np.inf, dtype=np.float32)
        for g0 in range(0, len(gallery), chunk_size):
            s = p @ l2_normalise(gallery[g0:g0 + chunk_size]).T
            same = lab[:, None] == g_lab[None, g0:g0 + chunk_size]
            np.maximum(best, np.where(same, s, -np.inf).max(axis=1), out=best)
        # pass 2: count other-identity gallery items and distractors scoring >= it
        above = np.zeros(len(p), dtype=np.int64)
        for g0 in range(0, len(gallery), chunk_size):
            s = p @ l2_normalise(gallery[g0:g0 + chunk_size]).T
            other = lab[:, None] != g_lab[None, g0:g0 + chunk_size]
            above += np.count_nonzero((s >= best[:, None]) & other, axis=1)
        if distractors is not None:
            for d0 in range(0, len(distractors), chunk_size):
                s = p @ l2_normalise(distractors[d0:d0 + chunk_size]).T
                above += np.count_nonzero(s >= best[:, None], axis=1)
        ranks[p0:p0 + block] = above + 1
    return ranks


def identify(probe_emb, probe_labels, gallery_emb, gallery_labels, distractor_emb=None,
             ranks: Sequence[int] = (1, 5, 10), chunk_size: int = DEFAULT_CHUNK) -> dict:
    """Rank-k identification rates: ``{"rank": {"1": f, "5": f, ...}, "probes": n, "gallery": n,
    "distractors": n}``; rates are fractions of probes whose true match ranks <= k."""
    r = match_ranks(probe_emb, probe_labels, gallery_emb, gallery_labels, distractor_emb, chunk_size)
    if r.size == 0:
        raise DcqError("no probes to identify")
    n_distractors = 0 if distractor_emb is None else len(distractor_emb)
    return {
        "rank": {str(int(k)): float(np.mean(r <= int(k))) for k in ranks},
        "probes": int(r.size),
        "gallery": len(gallery_labels),
        "distractors": int(n_distractors),
    }
