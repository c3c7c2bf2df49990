"""Data-path speed: synthetic rendering, .rec decode + augment per process, and through a DataLoader.

    python benchmarks/data_speed.py [--images 3000] [--size 112] [--workers 1,2] [--json OUT]

The first three rows run in one process on one core. The DataLoader rows feed the real training path
(``PairSampler`` -> ``PairDataset`` -> collate, two images per item as DCQ reads them) with
``--workers`` worker processes, batch 128, prefetch 4, each worker with one torch thread.

Both numbers should stay above 1,000 images/s per core at 112x112: the synthetic set must be quick
to regenerate, and the loader must not starve a CPU/GPU training step (workers scale it further).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch


def bench_synth(n: int, size: int) -> float:
    """Images/s of render + JPEG encode, identities in runs as synthesize() renders them."""
    from dcq.data.synthetic import FaceRenderer, identity_params, render_instance

    renderer = FaceRenderer(size)
    render_instance(renderer, 0, 0, 0)  # warm-up (noise/light banks)
    per_id = 40
    t = time.perf_counter()
    done = 0
    ident_id = 0
    while done < n:
        ident = identity_params(0, ident_id)
        for k in range(min(per_id, n - done)):
            render_instance(renderer, 0, ident_id, k, ident=ident)
            done += 1
        ident_id += 1
    return n / (time.perf_counter() - t)


def bench_loader(n: int, size: int, tmp: str) -> tuple[float, float]:
    """Images/s of FaceRecordIO read + decode + flip + normalise, and of PairDataset items."""
    from dcq.data import FaceRecordIO, PairDataset, PairSampler, TrainTransform
    from dcq.data.recordio import write_face_recordio
    from dcq.data.synthetic import FaceRenderer, identity_params, render_instance

    renderer = FaceRenderer(size)
    items = []
    for i in range(n):
        c = i // 40
        items.append((c, render_instance(renderer, 1, c, i % 40, ident=identity_params(1, c))))
    write_face_recordio(tmp, items)
    ds = FaceRecordIO(os.path.join(tmp, "train.rec"))
    tf = TrainTransform(size)
    t = time.perf_counter()
    for i in range(len(ds)):
        tf(ds.image_bytes(i))
    images_per_s = len(ds) / (time.perf_counter() - t)
    pairs = PairDataset(ds, tf)
    sampler = PairSampler(ds.labels, mode="identity")
    t = time.perf_counter()
    for item in sampler:
        pairs[item]
    pair_images_per_s = 2 * len(sampler) / (time.perf_counter() - t)
    return images_per_s, pair_images_per_s


def bench_dataloader(n: int, size: int, tmp: str, workers: int, batch: int = 128) -> float:
    """Images/s (samples + references) through DataLoader workers, after the first batch."""
    from torch.utils.data import DataLoader

    from dcq.data import FaceRecordIO, PairDataset, PairSampler, TrainTransform

    ds = FaceRecordIO(os.path.join(tmp, "train.rec"))
    sampler = PairSampler(ds.labels, mode="identity", seed=0)
    loader = DataLoader(PairDataset(ds, TrainTransform(size)), batch_size=batch, sampler=sampler, drop_last=True,
                        num_workers=workers, prefetch_factor=4 if workers else None, worker_init_fn=_one_thread)
    it = iter(loader)
    next(it)
    t = time.perf_counter()
    items = sum(x.shape[0] for x, _, _ in it)
    return 2 * items / (time.perf_counter() - t)


def _one_thread(_):
    torch.set_num_threads(1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--workers", default="1,2", help="DataLoader worker counts to time (default: %(default)s)")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    synth = bench_synth(args.images, args.size)
    workers = [int(w) for w in args.workers.split(",") if w]
    with tempfile.TemporaryDirectory() as tmp:
        loader, pair_loader = bench_loader(args.images, args.size, tmp)
        per_workers = {w: bench_dataloader(args.images, args.size, tmp, w) for w in workers}
    rows = [
        ("synthesize: render + JPEG", synth),
        ("loader: .rec read + decode + flip + normalise", loader),
        ("loader: PairDataset (sample + reference), per image", pair_loader),
    ] + [(f"DataLoader, {w} worker(s), batch 128, per image", v) for w, v in per_workers.items()]
    print(f"data speed at {args.size}x{args.size}, one process, torch threads=1, {args.images} images")
    for name, v in rows:
        flag = "ok" if v >= 1000 else "BELOW 1000/s"
        print(f"  {name:<55s} {v:8.0f} images/s  {flag}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"image_size": args.size, "images": args.images, "synth_images_per_s": synth,
                       "loader_images_per_s": loader, "pair_loader_images_per_s": pair_loader,
                       "dataloader_images_per_s": {str(w): v for w, v in per_workers.items()},
                       "numpy": np.__version__, "torch": torch.__version__}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
