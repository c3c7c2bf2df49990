"""Loader speed side by side on one synthetic .rec: the Pillow path, the libjpeg-turbo path, insightface's.

    python benchmarks/data_speed.py [--identities 120] [--size 112] [--workers 0,1,2] [--refs 1,2]
                                    [--batches 10] [--rounds 3] [--device cpu|cuda] [--mxnet-python PY]
                                    [--json OUT]

Three ways of turning a ``train.rec`` record into what the training step takes, all on the same file:

- ``pillow-float`` (the path before libjpeg-turbo, as it was): Pillow decode, flip, float32 normalised
  in the worker, torch's default collate (contiguous planes), items seeded with ``torch.manual_seed``;
- ``turbo-uint8`` (what ``dcq train`` runs now): simplejpeg (libjpeg-turbo) decode, flip, uint8 in the
  decoder's pixel order (``chw_view``, ``collate_pairs``), items seeded on the CPU generator only;
  ``(x - 127.5) / 127.5`` and the layout change happen on the device after the copy (not timed on CPU);
- ``turbo-uint8-planes``: the same, but rearranged into contiguous planes in the worker
  (``to_chw_uint8``, default collate), which isolates what the pixel order is worth;
- ``mxnet``: insightface's ``MXFaceDataset`` (``MXIndexedRecordIO.read_idx``, ``recordio.unpack``,
  ``mx.image.imdecode``, then flip and float normalisation as its torchvision transform does them,
  default collate), mxnet's engine made synchronous (``MXNET_ENGINE_TYPE=NaiveEngine``, one thread).

Rows: decoders alone; per image in one process (= one worker core: record read + decode + flip +
tensor + into a batch of ``--batch``); DCQ items (1 sample + k references, the training feed:
``PairSampler`` -> seeded items -> collate, batch 128, prefetch 4, one torch thread per worker) with
0/1/2 DataLoader workers; at k = 2 and 0 workers also ``turbo-uint8`` with its items seeded by
``torch.manual_seed`` as before, and ``turbo-uint8-planes``, which isolate what those two changes are
worth; bytes per batch between worker and trainer. Every configuration is timed once per round,
rounds interleave them, the median is reported, so machine noise hits all alike.

mxnet 1.9.1 (the last release) needs numpy < 1.24, so it usually cannot share dcq's environment: give
``--mxnet-python`` a Python where ``import mxnet, torch, PIL`` works (e.g. a venv with
``pip install mxnet==1.9.1 'numpy<1.24' torch Pillow``); its rows then run in that interpreter, one
subprocess per round. Without either, the mxnet rows say why and are left out.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PATHS = ("pillow-float", "turbo-uint8")  # "pillow-uint8" stands in for the second where simplejpeg is missing
MXNET = "mxnet"
OLD_SEEDING = "turbo-uint8+manual_seed"  # the new path with the old per-item seeding (k = 2, 0 workers)
PLANES = "turbo-uint8-planes"  # the new path, uint8 rearranged into contiguous planes in the worker
# path -> (decoder, normalised in the worker, pixel order kept, per-item torch.manual_seed)
SPECS = {"pillow-float": ("pil", True, False, True), "turbo-uint8": ("turbo", False, True, False),
         "pillow-uint8": ("pil", False, True, False), OLD_SEEDING: ("turbo", False, True, True),
         PLANES: ("turbo", False, False, False)}
_MX_ENV = {"MXNET_ENGINE_TYPE": "NaiveEngine", "OMP_NUM_THREADS": "1", "MXNET_CPU_WORKER_NTHREADS": "1"}


def _one_thread(_=None):
    torch.set_num_threads(1)


# ------------------------------------------------------------------------------ the three paths
class MXNetPairs(torch.utils.data.Dataset):
    """insightface's MXFaceDataset per image, applied to a DCQ item's sample and references."""

    def __init__(self, rec_dir: str, num_images: int):
        self.rec_dir, self.num_images = rec_dir, int(num_images)
        self._rec, self._pid = None, None

    def _reader(self):
        if self._pid != os.getpid():  # one handle per process, as MXIndexedRecordIO wants
            import mxnet as mx

            d = self.rec_dir
            self._rec = mx.recordio.MXIndexedRecordIO(f"{d}/train.idx", f"{d}/train.rec", "r")
            self._pid = os.getpid()
        return self._rec

    def image(self, i: int) -> torch.Tensor:
        import mxnet as mx
        from PIL import Image

        # header layout (MS1M, what synthesize writes): image i is record key i + 1
        _, payload = mx.recordio.unpack(self._reader().read_idx(i + 1))
        pil = Image.fromarray(mx.image.imdecode(payload).asnumpy())
        if torch.rand(1).item() < 0.5:
            pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        t = torch.from_numpy(np.array(pil)).permute(2, 0, 1).contiguous()
        return t.float().div_(255).sub_(0.5).div_(0.5)

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, item):
        sample, refs = item
        return self.image(sample), torch.stack([self.image(r) for r in refs]), 0


class PlanesTransform:
    """TrainTransform's uint8 output rearranged into contiguous planes in the worker (``to_chw_uint8``)."""

    def __init__(self, transform):
        self.inner = transform

    def __call__(self, data):
        from dcq.data.transforms import decode_image, to_chw_uint8

        img = decode_image(data, self.inner.image_size, decoder=self.inner.decoder)
        return to_chw_uint8(img, flip=self.inner.should_flip())


def _dataset(path: str, rec_dir: str, size: int, refs: int):
    """(the dataset the training feed indexes with (sample, references, seed), its collate_fn)."""
    from dcq.data import FaceRecordIO

    ds = FaceRecordIO(os.path.join(rec_dir, "train.rec"))
    if path == MXNET:  # its interpreter may hold only mxnet, torch and Pillow
        return MXNetPairs(rec_dir, len(ds)), None
    from dcq.data import PairDataset, TrainTransform
    from dcq.data.batching import collate_pairs
    from dcq.train.feed import SeededItems

    class ManualSeedItems(SeededItems):
        """The per-item seeding before: ``torch.manual_seed``, which also queues a lazy seeding of every
        accelerator generator with a formatted stack trace (the CPU stream is the same)."""

        seed_item = staticmethod(torch.manual_seed)

    decoder, normalized, pixel_order, manual_seed = SPECS[path]
    transform = TrainTransform(size, decoder=decoder, normalize=normalized)
    if not normalized and not pixel_order:
        transform = PlanesTransform(transform)
    pairs = PairDataset(ds, transform, num_references=refs)
    return (ManualSeedItems if manual_seed else SeededItems)(pairs), (collate_pairs if pixel_order else None)


def _single_image(path: str, rec_dir: str, size: int, n: int, batch: int):
    """() -> images/s of record read + decode + flip + tensor + into batches of `batch`, one process."""
    from torch.utils.data import default_collate

    from dcq.data.batching import stack_images

    data, collate = _dataset(path, rec_dir, size, 1)
    stack = stack_images if collate is not None else default_collate
    if path == MXNET:
        image = data.image
    else:
        source, transform = data.inner.source, data.inner.transform
        image = lambda i: transform(source.image_bytes(i))
    n = max(batch, n // batch * batch)
    stack([image(i) for i in range(min(batch, 32))])  # warm-up: open the file, load the libraries

    def run() -> float:
        t = time.perf_counter()
        for lo in range(0, n, batch):
            stack([image(i) for i in range(lo, lo + batch)])
        return n / (time.perf_counter() - t)

    return run


def _loader_run(path: str, rec_dir: str, args, refs: int, workers: int):
    """() -> DCQ items/s through a DataLoader, after its first batch; also the bytes of one batch.

    On CUDA the batches are pinned, copied non-blocking and uint8 ones normalised there, as
    ``TrainStep`` does; on CPU they are taken as they come out of the loader."""
    from torch.utils.data import DataLoader

    from dcq.data import FaceRecordIO, PairSampler
    from dcq.data.transforms import normalize

    groups = FaceRecordIO(os.path.join(rec_dir, "train.rec")).groups
    data, collate = _dataset(path, rec_dir, args.size, refs)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    info = {}

    def to_device(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, non_blocking=True)
        return normalize(x) if x.dtype == torch.uint8 else x

    def run() -> float:
        pairs = PairSampler(groups, mode="identity", num_references=refs, seed=0)
        if path == MXNET:
            sampler = pairs
        else:
            from dcq.train.feed import PositionedSampler

            sampler = PositionedSampler(pairs, 0)
        loader = DataLoader(data, batch_size=args.batch, sampler=sampler, drop_last=True, num_workers=workers,
                            collate_fn=collate, prefetch_factor=4 if workers else None, worker_init_fn=_one_thread,
                            pin_memory=cuda)
        it = iter(loader)
        x, r, _ = next(it)
        info["batch_bytes"] = x.nbytes + r.nbytes
        info["dtype"] = str(x.dtype).replace("torch.", "")
        t = time.perf_counter()
        items = 0
        for _ in range(args.batches):
            x, r, _ = next(it)
            if cuda:
                x, r = to_device(x), to_device(r)
            items += x.shape[0]
        if cuda:
            torch.cuda.synchronize()
        rate = items / (time.perf_counter() - t)
        del it
        return rate

    return run, info


def _decoders(rec_dir: str, n: int):
    """name -> () -> images/s of the decoder alone on the first n JPEGs (bytes already in memory)."""
    from PIL import Image

    from dcq.data import FaceRecordIO

    ds = FaceRecordIO(os.path.join(rec_dir, "train.rec"))
    blobs = [ds.image_bytes(i) for i in range(n)]

    def timed(decode):
        def run() -> float:
            t = time.perf_counter()
            for b in blobs:
                decode(b)
            return n / (time.perf_counter() - t)
        return run

    def pil(b):
        with Image.open(io.BytesIO(b)) as im:
            return np.array(im.convert("RGB"))

    out = {"Pillow": timed(pil)}
    try:
        import simplejpeg
    except ImportError:
        pass
    else:
        out["simplejpeg"] = timed(lambda b: simplejpeg.decode_jpeg(b, colorspace="RGB"))
    try:
        import turbojpeg

        tj = turbojpeg.TurboJPEG()
    except Exception:  # not installed, or no system libturbojpeg it can load
        pass
    else:
        out["PyTurboJPEG"] = timed(lambda b: tj.decode(b, pixel_format=turbojpeg.TJPF_RGB))
    return out


# ------------------------------------------------------------------------------ measuring
def _configs(paths, rec_dir, args):
    """name -> (() -> rate, info): every configuration, built before any is timed."""
    configs = {}
    for path in paths:
        configs[("image", path)] = (_single_image(path, rec_dir, args.size, args.images, args.batch), {})
        for k in args.refs:
            for w in args.workers:
                configs[("items", path, k, w)] = _loader_run(path, rec_dir, args, k, w)
    if "turbo-uint8" in paths:
        configs[("image", PLANES)] = (_single_image(PLANES, rec_dir, args.size, args.images, args.batch), {})
        k, w = max(args.refs), min(args.workers)
        for path in (OLD_SEEDING, PLANES):
            configs[("items", path, k, w)] = _loader_run(path, rec_dir, args, k, w)
    return configs


def _round(configs, r: int) -> dict:
    keys = list(configs)
    shift = r % len(keys)  # rotate the order from round to round
    return {key: configs[key][0]() for key in keys[shift:] + keys[:shift]}


def _mxnet_child(argv) -> int:
    """The mxnet rows in this interpreter, one round; JSON on stdout."""
    ap = _parser()
    ap.add_argument("--rec-dir", required=True)
    ap.add_argument("--round", type=int, default=0)
    args = _parse(ap, argv)
    _one_thread()
    configs = _configs([MXNET], args.rec_dir, args)
    rates = _round(configs, args.round)
    infos = {key: info for key, (_, info) in configs.items()}
    print(json.dumps([[list(k), v, infos[k]] for k, v in rates.items()]))
    return 0


def _mxnet_rounds(args, rec_dir: str) -> tuple[str | None, object]:
    """(None, run(round) -> results) where mxnet can run; (reason, None) where it cannot."""
    try:
        import mxnet  # noqa: F401
    except Exception as exc:
        in_process_error = f"{type(exc).__name__}: {exc}"
        if not args.mxnet_python:
            return f"mxnet not installable here (import mxnet: {in_process_error}); see --mxnet-python", None
        python = args.mxnet_python
    else:
        python = sys.executable
    env = dict(os.environ, **_MX_ENV)
    src = str(Path(__file__).resolve().parent.parent / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    base = [python, str(Path(__file__).resolve()), "--mxnet-child", "--rec-dir", rec_dir, "--size", str(args.size),
            "--images", str(args.images), "--workers", ",".join(map(str, args.workers)),
            "--refs", ",".join(map(str, args.refs)), "--batches", str(args.batches), "--batch", str(args.batch),
            "--device", args.device]
    probe = subprocess.run([python, "-c", "import mxnet, torch, PIL; print(mxnet.__version__)"], env=env,
                           capture_output=True, text=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return f"mxnet not installable here ({python}: {last})", None

    def run(r: int):
        done = subprocess.run(base + ["--round", str(r)], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"mxnet rows failed: {done.stderr.strip()[-2000:]}")
        return [(tuple(k), v, info) for k, v, info in json.loads(done.stdout.strip().splitlines()[-1])]

    run.version = probe.stdout.strip()
    return None, run


def _synth_rate(size: int, n: int) -> float:
    """Images/s of render + JPEG encode, identities in runs as synthesize() renders them."""
    from dcq.data.synth import FaceRenderer, identity_params, render_instance

    renderer = FaceRenderer(size)
    render_instance(renderer, 0, 0, 0)  # warm-up (noise/light banks)
    t = time.perf_counter()
    for i in range(n):
        render_instance(renderer, 0, i // 40, i % 40, ident=identity_params(0, i // 40))
    return n / (time.perf_counter() - t)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--identities", type=int, default=120, help="synthetic ms1m identities (~45 images each)")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--images", type=int, default=2000, help="images per single-process and decoder timing")
    ap.add_argument("--workers", default="0,1,2", help="DataLoader worker counts (default: %(default)s)")
    ap.add_argument("--refs", default="1,2", help="references per DCQ item, k (default: %(default)s)")
    ap.add_argument("--batches", type=int, default=10, help="batches timed per loader run, after the first")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cuda: pinned batches copied and normalised there")
    ap.add_argument("--mxnet-python", default=None, help="a Python that can import mxnet, torch and PIL")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    ap.add_argument("--mxnet-child", action="store_true", help=argparse.SUPPRESS)
    return ap


def _parse(ap, argv):
    args = ap.parse_args(argv)
    args.workers = [int(w) for w in str(args.workers).split(",") if w]
    args.refs = [int(k) for k in str(args.refs).split(",") if k]
    return args


def _median(values) -> float:
    return float(statistics.median(values))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--mxnet-child" in argv:
        return _mxnet_child(argv)
    args = _parse(_parser(), argv)
    _one_thread()
    from dcq.data import synthesize

    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        stats = synthesize(tmp, profile="ms1m", identities=args.identities, image_size=args.size, val_identities=2,
                           val_pairs=20, probes_per_identity=0, progress=False)
        per_epoch = stats["images"] // args.batch
        if per_epoch < args.batches + 1:
            raise SystemExit(f"{stats['images']} images give {per_epoch} batches of {args.batch}; "
                             f"raise --identities or lower --batches")
        decoders = _decoders(tmp, args.images)
        paths = list(PATHS) if "simplejpeg" in decoders else ["pillow-float", "pillow-uint8"]
        configs = _configs(paths, tmp, args)
        mx_reason, mx_run = _mxnet_rounds(args, tmp)
        rates: dict = {}
        infos = {key: info for key, (_, info) in configs.items()}
        for r in range(args.rounds):
            for name, fn in decoders.items():
                rates.setdefault(("decoder", name), []).append(fn())
            for key, v in _round(configs, r).items():
                rates.setdefault(key, []).append(v)
            if mx_run is not None:
                for key, v, info in mx_run(r):
                    rates.setdefault(key, []).append(v)
                    infos[key] = info
            print(f"  round {r + 1}/{args.rounds} done ({time.time() - started:.0f}s)", flush=True)
        synth = _synth_rate(args.size, min(args.images, 1000))
    med = {key: _median(v) for key, v in rates.items()}
    paths += [MXNET] if mx_run is not None else []
    return _report(args, stats, med, infos, paths, decoders, synth, mx_reason,
                   getattr(mx_run, "version", None), time.time() - started)


def _report(args, stats, med, infos, paths, decoders, synth, mx_reason, mx_version, seconds) -> int:
    size = args.size
    print(f"\nloader speed at {size}x{size} on one synthetic ms1m .rec ({stats['images']} images, "
          f"{stats['identities']} identities), torch threads = 1, median of {args.rounds} interleaved rounds, "
          f"{seconds:.0f}s")
    print(f"\ndecoder alone ({args.images} JPEGs in memory), images/s:")
    for name in decoders:
        print(f"  {name:<14s} {med[('decoder', name)]:8.0f}")
    print(f"\nper image, one process (= one worker core): record read + decode + flip + tensor + into a batch "
          f"of {args.batch}, images/s:")
    base = med[("image", paths[0])]
    image_rows = list(paths)
    if ("image", PLANES) in med:
        image_rows.insert(image_rows.index("turbo-uint8"), PLANES)
    for p in image_rows:
        v = med[("image", p)]
        print(f"  {p:<18s} {v:8.0f}   x{v / base:.2f} of {paths[0]}")
    where = "copied to and normalised on " + args.device if args.device != "cpu" else "as they leave the loader"
    print(f"\nDCQ items/s (1 sample + k references; images/s = items/s x (1 + k)), batch {args.batch}, {where}:")
    header = "  ".join(f"{w} worker{'s' if w != 1 else ' '}" for w in args.workers)
    for k in args.refs:
        print(f"  k = {k}:        {header}    batch bytes (dtype)")
        for p in paths:
            cells = "  ".join(f"{med[('items', p, k, w)]:9.0f}" for w in args.workers)
            info = infos[("items", p, k, args.workers[0])]
            print(f"  {p:<14s} {cells}    {info['batch_bytes'] / 1e6:6.1f} MB ({info['dtype']})")
    variants = [key for key in med if key[0] == "items" and key[1] in (OLD_SEEDING, PLANES)]
    if variants:
        print("\nturbo-uint8 with one part as before, DCQ items/s:")
    for _, variant, k, w in variants:
        new, old = med[("items", "turbo-uint8", k, w)], med[("items", variant, k, w)]
        print(f"  k = {k}, {w} workers: {variant} {old:.0f}, turbo-uint8 {new:.0f} "
              f"(x{new / old:.2f}; {1e6 / old - 1e6 / new:.0f} µs per item)")
    if "simplejpeg" not in decoders:
        print("\nsimplejpeg is not installed here (pip install 'dcq[fast-jpeg]'): no libjpeg-turbo rows")
    if mx_reason:
        print(f"\n{MXNET}: {mx_reason}")
    elif mx_version:
        print(f"\n{MXNET} {mx_version} rows: {args.mxnet_python or sys.executable}, {_MX_ENV}")
    print(f"\nsynthesize: render + JPEG encode {synth:.0f} images/s")
    if args.json:
        from dcq.atomic import atomic_write

        payload = {
            "image_size": size, "images": stats["images"], "identities": stats["identities"], "rounds": args.rounds,
            "batch": args.batch, "batches": args.batches, "seconds": seconds, "device": args.device,
            "cpu_cores": os.cpu_count(),
            "decoder_images_per_s": {n: med[("decoder", n)] for n in decoders},
            "image_per_s": {p: med[("image", p)] for p in image_rows},
            "items_per_s": {p: {str(k): {str(w): med[("items", p, k, w)] for w in args.workers} for k in args.refs}
                            for p in paths},
            "batch_bytes": {p: {str(k): infos[("items", p, k, args.workers[0])]["batch_bytes"] for k in args.refs}
                            for p in paths},
            "items_per_s_variants": {f"{v}_k{k}_w{w}": med[("items", v, k, w)] for _, v, k, w in variants},
            "mxnet": mx_reason or mx_version, "synth_images_per_s": synth,
            "numpy": np.__version__, "torch": torch.__version__,
        }
        atomic_write(args.json, lambda f: f.write(json.dumps(payload, indent=1).encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
