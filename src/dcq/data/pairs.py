"""(sample, reference) pairs of one identity: what DCQ trains on.

DCQ feeds the *sample* image to the trained feature extractor and a *reference* image of the same
identity to the EMA weight generator, whose output becomes that identity's classifier weight for the
step (and then joins the queue). The reference should be a different image of the identity, so the
generated weight does not just memorise the sample.

``PairSampler`` decides which images (a deterministic function of seed, epoch and rank) and
``PairDataset`` decodes them; together they give batches ``(B,3,H,W), (B,k,3,H,W), (B,)``.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from dcq.errors import DcqError

__all__ = ["PairDataset", "PairSampler"]

log = logging.getLogger(__name__)


class PairSampler(Sampler):
    """Yields ``(sample_index, (reference_index, ...))`` for one epoch of this rank's share.

    - ``mode="image"``: the epoch is a permutation of all images (every image is a sample once,
      so large identities dominate, like plain shuffling);
    - ``mode="identity"``: each item draws an identity uniformly (among identities with images),
      then one of its images uniformly; an epoch has as many items as there are images. This is the
      class-balanced sampling long-tailed data asks for.

    References: ``num_references`` other images of the sample's identity, uniform and without
    replacement while there are enough (then with replacement among the others); an identity with a
    single image uses that image as its own reference.

    Deterministic for ``(seed, epoch)``: the whole epoch is drawn from ``np.random.default_rng([seed,
    epoch])`` identically on every rank, then rank ``r`` takes items ``r, r + W, r + 2W, ...``. Like
    ``DistributedSampler`` (``drop_last=False``), the epoch is padded by repeating its first items so
    every rank gets ``ceil(N / W)``; with ``drop_last=True`` it is trimmed to ``floor(N / W)`` per rank.
    Call ``set_epoch`` before each epoch; ``set_epoch(epoch, start=n)`` skips the ``n`` items of this
    rank's share already consumed, so a resumed run sees exactly the rest of the epoch.
    """

    MODES = ("image", "identity")

    def __init__(self, labels, mode: str = "image", num_references: int = 1, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False):
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0:
            raise DcqError(f"PairSampler needs a non-empty 1-D array of labels, got shape {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise DcqError(f"PairSampler labels must be integers, got dtype {labels.dtype}")
        if mode not in self.MODES:
            raise DcqError(f"unknown pair sampling mode {mode!r}; choose 'image' or 'identity'")
        if num_references < 1:
            raise DcqError(f"num_references must be at least 1, got {num_references}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DcqError(f"rank {rank} is not in [0, world_size={world_size})")
        self.labels = labels.astype(np.int64)
        self.mode = mode
        self.num_references = int(num_references)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.start = 0
        n = self.labels.size
        # images grouped by identity: _order[_starts[c]:_starts[c] + _counts[c]] are identity c's images
        self._order = np.argsort(self.labels, kind="stable")
        uniq, first, counts = _groups(self.labels[self._order])
        self._ids = uniq
        self._starts = first
        self._counts = counts
        # position of every image inside its identity's group, and the group it belongs to
        self._group_of = np.empty(n, dtype=np.int64)
        self._group_of[self._order] = np.repeat(np.arange(uniq.size), counts)
        self._pos_in_group = np.empty(n, dtype=np.int64)
        self._pos_in_group[self._order] = np.arange(n) - np.repeat(first, counts)
        if self.drop_last:
            self.share = n // self.world_size
        else:
            self.share = math.ceil(n / self.world_size)
        if self.share == 0:
            raise DcqError(f"{n} images cannot be split over {self.world_size} ranks with drop_last=True")

    @property
    def epoch_length(self) -> int:
        """Items this rank yields in a whole epoch."""
        return self.share

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.share:
            raise DcqError(f"start={start} is outside this rank's epoch share of {self.share} items")
        self.epoch = int(epoch)
        self.start = int(start)

    def __len__(self) -> int:
        """Items the next iteration yields (the epoch share minus ``start``)."""
        return self.share - self.start

    def epoch_items(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The whole epoch before it is split over ranks: samples (N,) and references (N, k)."""
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([self.seed, epoch])
        n = self.labels.size
        if self.mode == "image":
            samples = rng.permutation(n)
            groups = self._group_of[samples]
        else:
            groups = rng.integers(0, self._ids.size, size=n)
            local = np.floor(rng.random(n) * self._counts[groups]).astype(np.int64)
            samples = self._order[self._starts[groups] + local]
        refs = self._references(rng, samples, groups)
        return samples, refs

    def _references(self, rng: np.random.Generator, samples: np.ndarray, groups: np.ndarray) -> np.ndarray:
        """k references per sample: other images of its identity, distinct while possible."""
        k = self.num_references
        n = samples.size
        others = self._counts[groups] - 1  # how many other images each sample's identity has
        self_pos = self._pos_in_group[samples]
        chosen = np.empty((n, k), dtype=np.int64)  # draw order, indices into [0, others)
        sorted_chosen = np.empty((n, 0), dtype=np.int64)
        u = rng.random((n, k))
        for j in range(k):
            distinct = others - j > 0
            v = np.floor(u[:, j] * np.where(distinct, others - j, np.maximum(others, 1))).astype(np.int64)
            # map v to the v-th value not chosen yet (ascending scan over sorted earlier picks)
            for c in range(sorted_chosen.shape[1]):
                v = v + (distinct & (v >= sorted_chosen[:, c]))
            chosen[:, j] = v
            sorted_chosen = np.sort(np.concatenate([sorted_chosen, v[:, None]], axis=1), axis=1)
        # skip the sample itself: positions >= its own shift up by one
        pos = chosen + (chosen >= self_pos[:, None])
        # a single-image identity has no "other" image: keep its index in range (it is replaced below)
        pos = np.minimum(pos, self._counts[groups][:, None] - 1)
        refs = self._order[self._starts[groups][:, None] + pos]
        single = others == 0
        refs[single] = samples[single, None]
        return refs

    def __iter__(self):
        samples, refs = self.epoch_items()
        n = samples.size
        total = self.share * self.world_size
        if total > n:  # pad by repeating the start of the epoch, as DistributedSampler does
            reps = math.ceil(total / n)
            samples = np.tile(samples, reps)[:total]
            refs = np.tile(refs, (reps, 1))[:total]
        take = slice(self.rank + self.start * self.world_size, total, self.world_size)
        s = samples[take].tolist()
        r = refs[take].tolist()
        for a, b in zip(s, r):
            yield a, tuple(b)

    def __repr__(self) -> str:
        return (f"PairSampler(images={self.labels.size}, identities={self._ids.size}, mode={self.mode!r}, "
                f"num_references={self.num_references}, seed={self.seed}, rank={self.rank}/{self.world_size})")


def _groups(sorted_labels: np.ndarray):
    """Unique values, first positions and run lengths of a sorted array (no np.unique: faster)."""
    n = sorted_labels.size
    is_new = np.empty(n, dtype=bool)
    is_new[0] = True
    np.not_equal(sorted_labels[1:], sorted_labels[:-1], out=is_new[1:])
    first = np.flatnonzero(is_new)
    counts = np.diff(np.append(first, n))
    return sorted_labels[first], first, counts


class PairDataset(Dataset):
    """Decodes ``(sample_index, reference_indices)`` into ``(sample, references, label)`` tensors.

    ``sample`` is (3,H,W), ``references`` (k,3,H,W), ``label`` an int, so the default collate gives
    (B,3,H,W), (B,k,3,H,W), (B,). Each image goes through ``transform`` independently (its own flip).

    ``preload=True`` decodes the whole source once into a shared uint8 (N,H,W,3) tensor, which makes
    small datasets train fast on CPU and is shared with DataLoader workers instead of copied.
    ``on_bad_record="skip"`` replaces an unreadable image with another image of the same identity,
    counts it in ``bad_records`` (shared across workers) and logs a warning; ``"fail"`` raises.
    """

    def __init__(self, source, transform, num_references: int = 1, preload: bool = False,
                 on_bad_record: str = "fail", progress: bool = True):
        if on_bad_record not in ("fail", "skip"):
            raise DcqError(f"on_bad_record must be 'fail' or 'skip', got {on_bad_record!r}")
        if num_references < 1:
            raise DcqError(f"num_references must be at least 1, got {num_references}")
        self.source = source
        self.transform = transform
        self.num_references = int(num_references)
        self.on_bad_record = on_bad_record
        self.image_size = getattr(transform, "image_size", None)
        self._bad = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._images: torch.Tensor | None = None
        self._bad_mask: np.ndarray | None = None
        if preload:
            self._preload(progress)

    @property
    def bad_records(self) -> int:
        """Images replaced because they could not be read (all workers together)."""
        return int(self._bad.item())

    def __len__(self) -> int:
        return len(self.source)

    def _preload(self, progress: bool) -> None:
        from tqdm import tqdm

        n = len(self.source)
        arr = None
        bad = np.zeros(n, dtype=bool)
        for i in tqdm(range(n), desc="decoding", unit="img", disable=not progress, dynamic_ncols=True):
            try:
                img = self.source.image(i, self.image_size)
            except DcqError:
                if self.on_bad_record == "fail":
                    raise
                bad[i] = True
                continue
            if arr is None:
                h, w = img.shape[:2]
                arr = torch.zeros((n, h, w, 3), dtype=torch.uint8)
            if img.shape != tuple(arr.shape[1:]):
                raise DcqError(
                    f"{self.source.where(i)}: image is {img.shape[1]}x{img.shape[0]} but earlier ones are "
                    f"{arr.shape[2]}x{arr.shape[1]}; give the transform an image_size to preload mixed sizes"
                )
            arr[i] = torch.from_numpy(img)
        if arr is None:
            raise DcqError("preload: no image of the dataset could be decoded")
        self._images = arr.share_memory_()
        self._bad_mask = bad

    def _load(self, i: int) -> np.ndarray:
        if self._images is not None:
            if self._bad_mask[i]:
                raise DcqError(f"{self.source.where(i)}: could not be decoded during preload")
            return self._images[i].numpy()
        return self.source.image(i, self.image_size)

    def _image(self, i: int) -> torch.Tensor:
        try:
            return self.transform(self._load(i))
        except DcqError as exc:
            if self.on_bad_record == "fail":
                raise
            return self._substitute(i, exc)

    def _substitute(self, i: int, exc: DcqError) -> torch.Tensor:
        label = self.source.label(i)
        candidates = [int(j) for j in self.source.indices_of(label) if j != i]
        gen_order = torch.randperm(len(candidates)).tolist() if candidates else []
        self._bad += 1
        log.warning("skipping bad image (%s); using another image of identity %d instead", exc, label)
        for c in gen_order:
            try:
                return self.transform(self._load(candidates[c]))
            except DcqError:
                self._bad += 1
                continue
        raise DcqError(f"{exc}; and no other image of identity {label} can be read to replace it")

    def __getitem__(self, item):
        if isinstance(item, (tuple, list)) and len(item) == 2:
            sample, refs = int(item[0]), tuple(int(r) for r in item[1])
        else:  # a plain index (e.g. a standard sampler): references drawn with torch's RNG
            sample = int(item)
            refs = self._random_refs(sample)
        if len(refs) != self.num_references:
            raise DcqError(
                f"PairDataset expects {self.num_references} reference(s) per sample but got {len(refs)}; "
                "use the same num_references for PairSampler and PairDataset"
            )
        x = self._image(sample)
        r = torch.stack([self._image(j) for j in refs])
        return x, r, self.source.label(sample)

    def _random_refs(self, sample: int) -> tuple:
        idx = self.source.indices_of(self.source.label(sample))
        others = idx[idx != sample]
        if others.size == 0:
            return (sample,) * self.num_references
        if others.size >= self.num_references:
            pick = torch.randperm(others.size)[: self.num_references]
        else:
            pick = torch.randint(others.size, (self.num_references,))
        return tuple(int(others[p]) for p in pick)
