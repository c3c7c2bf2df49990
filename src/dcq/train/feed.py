"""The training data feed: which items an epoch visits from which position, seeded so that a
resumed run reads and augments exactly what an uninterrupted one would have.

- `TrainingData.open` opens the training set and checks it can train this config;
- `PositionedSampler` yields (sample, references, item seed) from a start position in the epoch;
- `SeededItems` seeds torch's RNG per item, so augmentation is a function of the item, not of
  which DataLoader worker (or which incarnation of the process) decodes it;
- `TrainingData.loader` builds the epoch's DataLoader with a private shuffling generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dcq.data.batching import collate_pairs
from dcq.data.source import FaceSource
from dcq.errors import DcqError
from dcq.heads.registry import head_spec
from dcq.seeds import item_seed, stream_seed
from dcq.train import resume_check
from dcq.train.config import TrainConfig


class PositionedSampler(Sampler):
    """Wraps PairSampler: yields (sample, references, item_seed) from a start position within the epoch."""

    def __init__(self, pair_sampler, seed: int):
        self.pairs = pair_sampler
        self.seed = int(seed)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)
        self.pairs.set_epoch(epoch, start=start)

    def __len__(self) -> int:
        return len(self.pairs)  # PairSampler already counts from `start`

    def __iter__(self):
        for offset, (sample, references) in enumerate(self.pairs):
            yield sample, tuple(references), item_seed(self.seed, self.epoch, self.start + offset)


class SeededItems(Dataset):
    """Seeds torch's CPU RNG per item so augmentation is a function of the item, not of the worker.

    Only the CPU generator is seeded: ``torch.manual_seed`` also queues a lazy CUDA/XPU/MTIA seeding
    with a formatted stack trace on every call (about 70 µs, more inside a DataLoader's deep stack),
    which cost a third of a worker's time per DCQ item (``docs/data.md``, "Feeding a GPU"); the
    CPU stream it gives is the same."""

    def __init__(self, pairs_dataset):
        self.inner = pairs_dataset

    def __len__(self) -> int:
        return len(self.inner)

    @staticmethod
    def seed_item(seed: int) -> None:
        torch.default_generator.manual_seed(seed)

    def __getitem__(self, item):
        sample, references, seed = item
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
            self.seed_item(seed)
            return self.inner[(sample, references)]


@dataclass
class TrainingData:
    source: FaceSource
    sampler: PositionedSampler
    fingerprint: dict  # what a resumed run must train on (`resume_check.dataset_fingerprint`)
    items: SeededItems | None = None  # set by `prepare_items` (decoding may preload every image)

    @property
    def epoch_length(self) -> int:
        """Items this rank reads in one epoch."""
        return self.sampler.pairs.epoch_length

    @classmethod
    def open(cls, cfg: TrainConfig, rank: int, world_size: int) -> TrainingData:
        """Open `cfg.train_data` and its pair sampler; one DcqError line for a set that cannot train."""
        from dcq.data import PairSampler, open_dataset

        if not cfg.train_data:
            raise DcqError("config: train_data is empty; set it to a .rec file, a folder with train.rec, "
                           "or an image folder")
        source = open_dataset(cfg.train_data)
        n_images, n_ids = len(source), int(source.num_identities)
        if n_images == 0 or n_ids == 0:
            raise DcqError(f"training set {cfg.train_data} is empty")
        needed = head_spec(cfg.head).min_identities
        if n_ids < needed:
            raise DcqError(f"training set {cfg.train_data} has {n_ids} identity; head {cfg.head} needs at least "
                           f"{needed}")
        pairs = PairSampler(source.groups, mode=cfg.sampling, num_references=cfg.references,
                            seed=cfg.seed, rank=rank, world_size=world_size)
        if pairs.epoch_length < cfg.batch_size:
            raise DcqError(
                f"batch_size={cfg.batch_size} is larger than the {pairs.epoch_length} images per epoch this "
                f"process reads from {cfg.train_data}; lower batch_size or use more data"
            )
        return cls(source, PositionedSampler(pairs, cfg.seed),
                   resume_check.dataset_fingerprint(cfg.train_data, source))

    def prepare_items(self, cfg: TrainConfig, progress: bool) -> None:
        """Decoding and augmentation of every item (with `preload`, every image is decoded now)."""
        from dcq.data import PairDataset, TrainTransform

        # uint8 in the decoder's pixel order out of the workers; TrainStep normalises on the device
        transform = TrainTransform(cfg.image_size, flip=cfg.flip, normalize=False)
        self.pair_dataset = PairDataset(self.source, transform, num_references=cfg.references, preload=cfg.preload,
                                        on_bad_record=cfg.on_bad_record, progress=progress,
                                        decode_references=head_spec(cfg.head).needs_references)
        self.items = SeededItems(self.pair_dataset)

    @property
    def bad_records(self) -> int:
        return self.pair_dataset.bad_records if self.items is not None else 0

    def loader(self, cfg: TrainConfig, epoch: int, pin_memory: bool) -> DataLoader:
        """The DataLoader of `epoch` from the sampler's current position."""
        workers = cfg.workers
        # A private generator: creating the iterator must not draw from the global RNG, or a resumed
        # run (which creates it mid-epoch) would shift every later random number.
        shuffling = torch.Generator().manual_seed(stream_seed(cfg.seed, epoch))
        return DataLoader(self.items, batch_size=cfg.batch_size, sampler=self.sampler, drop_last=True,
                          collate_fn=collate_pairs, num_workers=workers, pin_memory=pin_memory, generator=shuffling,
                          persistent_workers=False, prefetch_factor=4 if workers else None)
