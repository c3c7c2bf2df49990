"""(sample, reference) pairs of one identity: what DCQ trains on.

DCQ feeds the *sample* image to the trained feature extractor and a *reference* image of the same
identity to the EMA weight generator, whose output becomes that identity's classifier weight for the
step (and then joins the queue). The reference should be a different image of the identity, so the
generated weight does not just memorise the sample.

``PairSampler`` decides which images (a deterministic function of seed, epoch and rank) and
``PairDataset`` decodes them; together they give batches ``(B,3,H,W), (B,k,3,H,W), (B,)`` (uint8 or
float32, as the transform returns them).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from dcq.data.batching import stack_images
from dcq.data.groups import LabelGroups
from dcq.data.keyed import KeyedPermutation, derive_keys, uniform
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

    Streaming: item ``p`` of an epoch is a pure function of ``(seed, epoch, p)`` (a keyed
    permutation of the images in image mode, counter-based uniforms in identity mode and for the
    references, see ``dcq.data.keyed``), so the epoch is never materialised: it is produced in chunks
    of ``chunk_size`` items, each rank computes only its own items, and ``set_epoch(epoch, start=n)``
    starts at item ``n`` at the cost of one chunk. Rank ``r`` takes epoch positions ``r, r + W,
    r + 2W, ...``. Like ``DistributedSampler`` (``drop_last=False``), the epoch is padded by repeating
    its first items so every rank gets ``ceil(N / W)``; with ``drop_last=True`` it is trimmed to
    ``floor(N / W)`` per rank. Call ``set_epoch`` before each epoch; ``set_epoch(epoch, start=n)``
    skips the ``n`` items of this rank's share already consumed, so a resumed run sees exactly the
    rest of the epoch.

    ``labels`` is a 1-D integer array (not copied; a memory-mapped one stays on disk) or a
    ``LabelGroups`` already built (``FaceRecordIO.groups`` comes from its index cache).
    """

    MODES = ("image", "identity")

    def __init__(self, labels, mode: str = "image", num_references: int = 1, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False, chunk_size: int = 1 << 16):
        if mode not in self.MODES:
            raise DcqError(f"unknown pair sampling mode {mode!r}; choose 'image' or 'identity'")
        if num_references < 1:
            raise DcqError(f"num_references must be at least 1, got {num_references}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DcqError(f"rank {rank} is not in [0, world_size={world_size})")
        if chunk_size < 1:
            raise DcqError(f"chunk_size must be at least 1, got {chunk_size}")
        if isinstance(labels, LabelGroups):
            self.groups = labels
        else:
            try:
                self.groups = LabelGroups.from_labels(labels)
            except DcqError as exc:
                raise DcqError(f"PairSampler: {exc}") from None
        self.labels = self.groups.labels
        self.mode = mode
        self.num_references = int(num_references)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)
        self.chunk_size = int(chunk_size)
        self.num_images = n = self.groups.num_images
        if self.drop_last:
            self.share = n // self.world_size
        else:
            self.share = math.ceil(n / self.world_size)
        if self.share == 0:
            raise DcqError(f"{n} images cannot be split over {self.world_size} ranks with drop_last=True")
        self.set_epoch(0)

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

    # ------------------------------------------------------------------ the draws
    def _draws(self, epoch: int):
        """Per-epoch keys: permutation, identity, image, then one per reference."""
        keys = derive_keys(self.seed, epoch, count=3 + self.num_references)
        perm = KeyedPermutation(self.num_images, keys[0]) if self.mode == "image" else None
        return perm, keys[1:]

    def items(self, lo: int, hi: int, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """This rank's items ``lo .. hi-1`` of an epoch: samples (m,) and references (m, k)."""
        if not 0 <= lo <= hi <= self.share:
            raise DcqError(f"items [{lo}, {hi}) are outside this rank's epoch share of {self.share}")
        return self.at_positions(self._positions(lo, hi), self.epoch if epoch is None else epoch)

    def _positions(self, lo: int, hi: int) -> np.ndarray:
        """Epoch positions of this rank's items lo .. hi-1 (past the end: the padding repeats the start)."""
        return (self.rank + np.arange(lo, hi, dtype=np.int64) * self.world_size) % self.num_images

    def at_positions(self, positions: np.ndarray, epoch: int, draws=None) -> tuple[np.ndarray, np.ndarray]:
        """Samples and references at positions of the unpadded epoch (all ranks' numbering)."""
        perm, keys = self._draws(epoch) if draws is None else draws
        g = self.groups
        positions = np.asarray(positions, dtype=np.int64)
        if self.mode == "image":
            samples = perm(positions)
            slots = g.slot_of(samples)
            first = g.starts[slots].astype(np.int64)
            counts = g.starts[slots + 1] - first
        else:
            slots = g.drawable_slot(np.floor(uniform(keys[0], positions) * g.num_drawable).astype(np.int64))
            first = g.starts[slots].astype(np.int64)
            counts = g.starts[slots + 1] - first
            local = np.floor(uniform(keys[1], positions) * counts).astype(np.int64)
            samples = g.image_at(first + local)
        refs = self._references(keys[2:], positions, samples, first, counts)
        return samples, refs

    def _references(self, keys, positions, samples, first, counts) -> np.ndarray:
        """k references per sample: other images of its identity, distinct while possible.

        Draws distinct ranks in [0, count - 1) among the identity's label-sorted images; the one rank
        that hits the sample itself is swapped for the last image (rank count - 1, never drawn), so
        the references are uniform over the other images without knowing the sample's rank.
        """
        k = self.num_references
        n = samples.size
        others = counts - 1  # how many other images each sample's identity has
        chosen = np.empty((n, k), dtype=np.int64)
        sorted_chosen = np.empty((n, 0), dtype=np.int64)
        for j in range(k):
            distinct = others - j > 0
            width = np.where(distinct, others - j, np.maximum(others, 1))
            v = np.floor(uniform(keys[j], positions) * width).astype(np.int64)
            # map v to the v-th value not chosen yet (ascending scan over sorted earlier picks)
            for c in range(sorted_chosen.shape[1]):
                v = v + (distinct & (v >= sorted_chosen[:, c]))
            chosen[:, j] = v
            sorted_chosen = np.sort(np.concatenate([sorted_chosen, v[:, None]], axis=1), axis=1)
        refs = self.groups.image_at(first[:, None] + chosen)
        clash = refs == samples[:, None]
        if clash.any():
            rows = np.nonzero(clash)[0]
            refs[clash] = self.groups.image_at(first[rows] + counts[rows] - 1)
        refs[others == 0] = samples[others == 0, None]
        return refs

    def epoch_items(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The whole epoch before it is split over ranks: samples (N,) and references (N, k).

        Materialises N items; for inspection and tests on small sets (iteration never calls it).
        """
        epoch = self.epoch if epoch is None else int(epoch)
        return self.at_positions(np.arange(self.num_images, dtype=np.int64), epoch)

    def __iter__(self):
        return self._iterate(self.epoch, self.start)

    def _iterate(self, epoch: int, start: int):
        draws = self._draws(epoch)
        for lo in range(start, self.share, self.chunk_size):
            hi = min(lo + self.chunk_size, self.share)
            samples, refs = self.at_positions(self._positions(lo, hi), epoch, draws)
            yield from zip(samples.tolist(), map(tuple, refs.tolist()))

    def __repr__(self) -> str:
        return (f"PairSampler(images={self.num_images}, identities={self.groups.num_drawable}, "
                f"mode={self.mode!r}, num_references={self.num_references}, seed={self.seed}, "
                f"rank={self.rank}/{self.world_size})")


class PairDataset(Dataset):
    """Decodes ``(sample_index, reference_indices)`` into ``(sample, references, label)`` tensors.

    ``sample`` is (3,H,W), ``references`` (k,3,H,W), ``label`` an int, so the default collate (or
    ``collate_pairs``) gives (B,3,H,W), (B,k,3,H,W), (B,). Each image goes through ``transform``
    independently (its own flip). With a ``normalize=False`` transform the images stay uint8 in the
    decoder's pixel order, which is what a DataLoader worker should hand over (a quarter of float32's
    bytes, nothing rearranged); ``collate_pairs`` keeps that order and ``TrainStep`` normalises on the
    device.

    ``preload=True`` decodes the whole source once into a shared uint8 (N,H,W,3) tensor, which makes
    small datasets train fast on CPU and is shared with DataLoader workers instead of copied.
    ``on_bad_record="skip"`` replaces an unreadable image with another image of the same identity,
    counts it in ``bad_records`` (shared across workers) and logs a warning; ``"fail"`` raises.
    """

    def __init__(self, source, transform, num_references: int = 1, preload: bool = False,
                 on_bad_record: str = "fail", progress: bool = True, decode_references: bool = True):
        if on_bad_record not in ("fail", "skip"):
            raise DcqError(f"on_bad_record must be 'fail' or 'skip', got {on_bad_record!r}")
        if num_references < 1:
            raise DcqError(f"num_references must be at least 1, got {num_references}")
        self.source = source
        self.transform = transform
        self.num_references = int(num_references)
        # False for heads that never use keys (FC, Partial FC): items are (sample, None, label), and
        # the sampler's reference draws are still made, so the sample stream is the same either way
        self.decode_references = bool(decode_references)
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
            return self._images[i].numpy().copy()  # the transform may return a view: never one of the shared set
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
        if not self.decode_references:
            return x, None, self.source.label(sample)
        r = stack_images([self._image(j) for j in refs], shared=False)
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
