"""Counter-based randomness: the random draws of any epoch position, computed in O(1) from a key.

A sampler that draws an epoch with a sequential generator must draw all of it on every rank, and
again on every resume. Here every draw is a pure function of ``(key, position)`` instead, evaluated
for a whole chunk of positions at once with numpy:

- ``uniform(key, positions)``: float64 in [0, 1), splitmix64 (state ``key + position * golden``,
  then its 64-bit finaliser; 53 bits kept);
- ``KeyedPermutation(n, key)``: a bijection of [0, n): a 6-round Feistel network on the smallest
  even number of bits that holds ``n - 1``, cycle-walking (re-applying it) until the value falls
  back inside [0, n). The domain is less than 4n, so a position needs under 4 rounds of walking on
  average.
"""

from __future__ import annotations

import numpy as np

__all__ = ["KeyedPermutation", "derive_keys", "uniform"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_ROUNDS = 6


def derive_keys(*words: int, count: int = 1) -> np.ndarray:
    """``count`` independent 64-bit keys from integers (e.g. seed, epoch, stream)."""
    return np.random.SeedSequence([int(w) for w in words]).generate_state(count, np.uint64)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place on a uint64 array (wrapping arithmetic)."""
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def random_bits(key, positions) -> np.ndarray:
    """64 random bits per position: the ``position``-th output of splitmix64 seeded with ``key``."""
    x = np.asarray(positions).astype(np.uint64)
    x *= _GOLDEN
    x += np.uint64(key)
    return _mix64(x)


def uniform(key, positions) -> np.ndarray:
    """A float64 in [0, 1) per position, a pure function of ``(key, position)``."""
    return (random_bits(key, positions) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class KeyedPermutation:
    """A pseudo-random bijection of [0, n) that maps any array of positions without building it."""

    def __init__(self, n: int, key):
        if n < 1:
            raise ValueError(f"KeyedPermutation needs n >= 1, got {n}")
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        bits += bits & 1
        self._half = np.uint64(bits // 2)
        self._mask = np.uint64((1 << (bits // 2)) - 1)
        self._round_keys = derive_keys(int(key), count=_ROUNDS)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left = x >> self._half
        right = x & self._mask
        for k in self._round_keys:
            f = right + k
            _mix64(f)
            left, right = right, left ^ (f & self._mask)
        return (left << self._half) | right

    def __call__(self, positions) -> np.ndarray:
        """The image at each position (int64), for positions in [0, n)."""
        pos = np.asarray(positions, dtype=np.int64)
        if pos.size and (pos.min() < 0 or pos.max() >= self.n):
            raise IndexError(f"positions must lie in [0, {self.n})")
        out = self._feistel(pos.astype(np.uint64))
        n = np.uint64(self.n)
        walk = np.flatnonzero(out >= n)
        while walk.size:  # cycle walking: a bijection of the domain restricted to [0, n)
            out[walk] = self._feistel(out[walk])
            walk = walk[out[walk] >= n]
        return out.astype(np.int64)
