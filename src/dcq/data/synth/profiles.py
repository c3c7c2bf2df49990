"""Long-tail profiles of the synthetic dataset: how many training images each identity gets, and the
images-per-identity buckets that statistics and the long-tail evaluation report by."""

from __future__ import annotations

import math

import numpy as np

from dcq.data.synth.identity import _COUNTS
from dcq.errors import DcqError

PROFILES = ("ms1m", "mf2")


def _norm_ppf(p: np.ndarray) -> np.ndarray:
    from statistics import NormalDist

    nd = NormalDist()
    return np.array([nd.inv_cdf(float(min(max(x, 1e-12), 1 - 1e-12))) for x in p])


_MF2_SMALL = np.arange(1, 10)
_MF2_SMALL_P = _MF2_SMALL ** -1.2 / np.sum(_MF2_SMALL ** -1.2)
_MF2_SMALL_FRACTION = 0.88


def images_per_identity(profile: str, identities: int, seed: int = 0) -> np.ndarray:
    """Training images of each identity for a named long-tail profile.

    Counts are drawn by stratified sampling of the profile's quantile function (one draw per
    1/N slice of probability, then shuffled), so even small sets have the profile's shape:

    - ``ms1m``: log-normal, median 40, sigma 0.7, clipped to [2, 400] (MS1MV2 has ~68 per identity,
      most identities tens of images, a head of a few hundred);
    - ``mf2``: 88% of identities have 1-9 images with P(k) proportional to k^-1.2 (many have 1-3),
      the rest a Pareto tail from 10 up to 500 (MegaFace2-like).
    """
    if profile not in PROFILES:
        raise DcqError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    if identities < 1:
        raise DcqError(f"identities must be at least 1, got {identities}")
    r = np.random.default_rng([seed, _COUNTS])
    q = (r.permutation(identities) + r.random(identities)) / identities
    if profile == "ms1m":
        counts = np.exp(math.log(40.0) + 0.7 * _norm_ppf(q))
        counts = np.clip(np.rint(counts), 2, 400)
    else:
        cdf = np.cumsum(_MF2_SMALL_P) * _MF2_SMALL_FRACTION
        small = q < _MF2_SMALL_FRACTION
        counts = np.empty(identities)
        counts[small] = _MF2_SMALL[np.searchsorted(cdf, q[small], side="right").clip(0, 8)]
        v = (q[~small] - _MF2_SMALL_FRACTION) / (1 - _MF2_SMALL_FRACTION)
        counts[~small] = np.minimum(np.floor(10 * (1 - v) ** (-1 / 1.2)), 500)
    return counts.astype(np.int64)


_BUCKETS = ((1, 1), (2, 2), (3, 4), (5, 9), (10, 19), (20, 49), (50, 99), (100, 199), (200, None))


def bucket_name(lo: int, hi: int | None) -> str:
    """The name of the bucket of identities with lo..hi images: "1", "3-4", "200+" (hi None = open)."""
    if hi is None:
        return f"{lo}+"
    return str(lo) if lo == hi else f"{lo}-{hi}"


def count_histogram(counts: np.ndarray) -> dict:
    """Number of identities per images-per-identity bucket ("1", "2", "3-4", ..., "200+")."""
    out = {}
    for lo, hi in _BUCKETS:
        name = bucket_name(lo, hi)
        sel = counts >= lo if hi is None else (counts >= lo) & (counts <= hi)
        out[name] = int(np.count_nonzero(sel))
    return out
