"""Index and pair sampler at WebFace260M scale: build time, first batch, mid-epoch resume, peak RSS.

    python benchmarks/data_scale.py --images 200e6 --identities 100e6 --dir /tmp/scale [--rec] [--json OUT]

Writes into ``--dir`` (kept between runs, so the sources are generated once per scale):

- ``labels.npy``: a labels-only index, int32, sorted by identity as insightface's header layout stores
  it; every identity has 1 image plus a share of the rest drawn uniformly (about 2 per identity at
  200M/100M, so one-image identities are common);
- ``train.idx``: ``key<TAB>offset`` lines (fixed width, 22 bytes a line) to time the ``.idx`` parser;
- with ``--rec``, ``rec/train.rec`` + ``rec/train.idx``: a plain-layout ``.rec`` of tiny records
  (no image bytes) opened end to end with ``FaceRecordIO`` (labels are float32 in the format, so
  this needs fewer than 2^24 identities).

Every configuration runs in a fresh subprocess (peak RSS is the child's ``VmHWM``; ``baseline`` is a
child that only imports the modules): ``cold`` builds the index cache from scratch, ``warm`` loads
it (size, mtime and CRC-32 checks, then memory maps). For world sizes 1 and 8 the process is the last
rank (simulated: every rank does the same work on its own share). ``first batch`` is the time from
the start of index loading to the first ``--batch`` items of epoch 0; ``resume`` the time from
``set_epoch(0, start=share // 2)`` to the first batch there.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

_RECORD_BYTES = 32  # framing (8) + IRHeader (24), no image


def _rss_mb() -> float:
    """Peak RSS of this process image: VmHWM (ru_maxrss would include the parent's RSS at fork)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- sources
def make_labels(path: Path, n: int, c: int, seed: int = 0) -> None:
    """Sorted int32 labels: each identity gets 1 image plus a uniform share of the other n - c."""
    rng = np.random.default_rng(seed)
    counts = np.ones(c, dtype=np.int64)
    for lo in range(0, n - c, 1 << 25):
        m = min(1 << 25, n - c - lo)
        counts += np.bincount(rng.integers(0, c, size=m, dtype=np.int32), minlength=c)
    labels = np.repeat(np.arange(c, dtype=np.int32), counts)
    np.save(path, labels)


def _ascii(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Right-aligned decimal digits of non-negative ints as a (m, D) uint8 matrix and its mask."""
    digits = max(1, len(str(int(a.max()))))
    mat = np.empty((a.size, digits), dtype=np.uint8)
    rest = a.copy()
    for j in range(digits - 1, -1, -1):
        mat[:, j] = 48 + rest % 10
        rest //= 10
    width = np.maximum(1, np.floor(np.log10(np.maximum(a, 1))).astype(np.int64) + 1)
    mask = np.arange(digits)[None, :] >= digits - width[:, None]
    return mat, mask


def make_idx(path: Path, n: int, record_bytes: int = _RECORD_BYTES, key0: int = 0) -> None:
    """``n`` lines ``key<TAB>offset`` (keys key0.., offsets key * record_bytes), formatted with numpy."""
    with open(path, "wb") as f:
        for lo in range(0, n, 1 << 22):
            keys = np.arange(lo, min(n, lo + (1 << 22)), dtype=np.int64) + key0
            k, km = _ascii(keys)
            o, om = _ascii((keys - key0) * record_bytes)
            sep = np.full((keys.size, 1), 9, np.uint8)
            nl = np.full((keys.size, 1), 10, np.uint8)
            ones = np.ones((keys.size, 1), bool)
            mat = np.concatenate([k, sep, o, nl], axis=1)
            mask = np.concatenate([km, ones, om, ones], axis=1)
            f.write(mat[mask].tobytes())


def make_fixed_idx(path: Path, n: int) -> None:
    """``n`` lines of a .idx for records of 100 bytes: 9-digit zero-padded keys, offsets ``key * 100``.

    Fixed width (22 bytes a line, as long as a real 200M-line index whose keys mostly have 9 digits)
    so the text is a template of 10^6 lines with the high digits filled in: seconds, not minutes.
    """
    if n > 10**9:
        raise SystemExit("make_fixed_idx: at most 10^9 lines")
    low = np.arange(10**6)
    table = np.empty((10**6, 22), dtype=np.uint8)
    for j in range(6):
        digit = 48 + (low // 10 ** (5 - j)) % 10
        table[:, 3 + j] = digit
        table[:, 13 + j] = digit
    table[:, 9] = 9
    table[:, 19:21] = 48
    table[:, 21] = 10
    with open(path, "wb") as f:
        for block in range(-(-n // 10**6)):
            high = [48 + (block // 10 ** (2 - j)) % 10 for j in range(3)]
            table[:, 0:3] = high
            table[:, 10:13] = high
            rows = min(10**6, n - block * 10**6)
            f.write(table[:rows].tobytes())


def make_rec(folder: Path, labels_path: Path) -> None:
    """A plain-layout .rec of tiny records (label only, no image) and its .idx."""
    from dcq.data.recordio_format import IR_STRUCT, MAGIC

    labels = np.load(labels_path, mmap_mode="r")
    if int(labels[-1]) >= 1 << 24:
        raise SystemExit("--rec needs fewer than 2^24 identities (labels are float32 in RecordIO)")
    folder.mkdir(parents=True, exist_ok=True)
    rec = np.dtype([("magic", "<u4"), ("lrec", "<u4"), ("flag", "<u4"), ("label", "<f4"), ("id", "<u8"),
                    ("id2", "<u8")])
    assert rec.itemsize == _RECORD_BYTES
    with open(folder / "train.rec", "wb") as f:
        for lo in range(0, labels.size, 1 << 22):
            part = np.asarray(labels[lo:lo + (1 << 22)])
            block = np.zeros(part.size, dtype=rec)
            block["magic"], block["lrec"], block["label"] = MAGIC, IR_STRUCT.size, part
            f.write(block.tobytes())
    make_idx(folder / "train.idx", labels.size)


# ----------------------------------------------------------------------------- measurements (children)
def child(args) -> dict:
    out: dict = {"what": args.what, "world": args.world}
    if args.what == "baseline":
        import dcq.data.pairs  # noqa: F401 - what every configuration imports (torch included)
        import dcq.data.recordio  # noqa: F401
    elif args.what == "idx":
        from dcq.data.recordio_format import read_index

        t = time.perf_counter()
        keys, _ = read_index(Path(args.dir) / "train.idx")
        out.update(lines=int(keys.size), parse_s=time.perf_counter() - t)
    else:
        out.update(_sampler_child(args))
    out["peak_rss_mb"] = _rss_mb()
    t = os.times()
    out["cpu_s"] = t.user + t.system  # the whole child, imports included; robust to a busy machine
    return out


def _sampler_child(args) -> dict:
    from dcq.data.groups import LabelGroups
    from dcq.data.index_cache import IndexCache
    from dcq.data.pairs import PairSampler

    out = {}
    t0 = time.perf_counter()
    if args.source == "labels":
        labels_path = Path(args.dir) / "labels.npy"
        cache = IndexCache(labels_path, [labels_path], {"kind": "labels"})
        loaded = cache.load()
        labels = np.load(labels_path, mmap_mode="r")
        if loaded is None:
            groups = LabelGroups.from_labels(labels)
            cache.save({}, groups.arrays())
        else:
            _, arrays = loaded
            groups = LabelGroups(labels=labels, **arrays)
    else:
        from dcq.data.recordio import FaceRecordIO

        ds = FaceRecordIO(Path(args.dir) / "rec" / "train.rec", cache=True)
        groups = ds.groups
    out["index_s"] = time.perf_counter() - t0
    out["index_rss_mb"] = _rss_mb()
    sampler = PairSampler(groups, mode=args.mode, seed=0, rank=args.world - 1, world_size=args.world)
    it = iter(sampler)
    batch = [next(it) for _ in range(args.batch)]
    out["first_batch_s"] = time.perf_counter() - t0
    assert len(batch) == args.batch
    t1 = time.perf_counter()
    sampler.set_epoch(0, start=sampler.epoch_length // 2)
    it = iter(sampler)
    batch = [next(it) for _ in range(args.batch)]
    out["resume_s"] = time.perf_counter() - t1
    out["share"] = sampler.epoch_length
    return out


def run_child(argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", *argv]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- driver
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=float, default=2e6)
    ap.add_argument("--identities", type=float, default=None, help="default: images / 2")
    ap.add_argument("--dir", default="/tmp/dcq-scale")
    ap.add_argument("--world", default="1,8")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--mode", default="image", choices=["image", "identity"])
    ap.add_argument("--rec", action="store_true", help="also time FaceRecordIO on a .rec of tiny records")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--what", default="baseline", help=argparse.SUPPRESS)
    ap.add_argument("--source", default="labels", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.world = int(args.world)
        print(json.dumps(child(args)))
        return 0

    n = int(args.images)
    c = int(args.identities or n // 2)
    folder = Path(args.dir) / f"n{n}-c{c}"
    folder.mkdir(parents=True, exist_ok=True)
    gen = {}
    for name, make in (("labels.npy", lambda p: make_labels(p, n, c)), ("train.idx", lambda p: make_fixed_idx(p, n))):
        if not (folder / name).exists():
            t = time.perf_counter()
            make(folder / f"{name}.part")
            os.replace(folder / f"{name}.part{'.npy' if name.endswith('.npy') else ''}", folder / name)
            gen[name] = time.perf_counter() - t
    if args.rec and not (folder / "rec" / "train.idx").exists():
        t = time.perf_counter()
        make_rec(folder / "rec", folder / "labels.npy")
        gen["rec"] = time.perf_counter() - t
    print(f"{n:,} images, {c:,} identities in {folder} (generated: "
          + (", ".join(f"{k} {v:.0f} s" for k, v in gen.items()) or "nothing, reused") + ")", flush=True)

    common = ["--dir", str(folder), "--batch", str(args.batch), "--mode", args.mode]
    rows = [run_child([*common, "--what", "baseline", "--world", "1"])]
    rows.append(run_child([*common, "--what", "idx", "--world", "1"]))
    sources = ["labels"] + (["rec"] if args.rec else [])
    for source in sources:
        for world in [int(w) for w in args.world.split(",")]:
            for state in ("cold", "warm"):
                if state == "cold":
                    for d in (folder / ".dcq-index", folder / "rec" / ".dcq-index"):
                        shutil.rmtree(d, ignore_errors=True)
                row = run_child([*common, "--what", state, "--world", str(world), "--source", source])
                row.update(source=source, state=state)
                rows.append(row)
                print(json.dumps(row), flush=True)
    base = rows[0]["peak_rss_mb"]
    print(f"\nbaseline RSS (python + numpy + torch imported): {base:.0f} MB")
    idx = rows[1]
    print(f".idx parse: {idx['lines']:,} lines in {idx['parse_s']:.1f} s, peak RSS {idx['peak_rss_mb']:.0f} MB")
    print(f"{'source':<7} {'cache':<5} {'world':>5} {'index s':>8} {'first batch s':>13} {'resume s':>8} "
          f"{'peak RSS MB':>11} {'minus baseline':>14}")
    for r in rows[2:]:
        print(f"{r['source']:<7} {r['state']:<5} {r['world']:>5} {r['index_s']:>8.2f} {r['first_batch_s']:>13.2f} "
              f"{r['resume_s']:>8.3f} {r['peak_rss_mb']:>11.0f} {r['peak_rss_mb'] - base:>14.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"images": n, "identities": c, "mode": args.mode, "batch": args.batch, "generated_s": gen,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
