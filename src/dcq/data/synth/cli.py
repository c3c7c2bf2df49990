"""`dcq synth OUT`: write the synthetic long-tailed face dataset in insightface formats.

Files are made in ``OUT/.synth-tmp-PID`` and moved into place at the end. SIGTERM (a cluster's
preemption, ``kill``) ends the run as Ctrl-C does, removing that folder; one left by a run killed
with ``kill -9`` is removed by the next run in OUT once its process is gone.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys
from pathlib import Path

from dcq.errors import DcqError


def configure_synth(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="output folder (created); gets train.rec/.idx or train/, val.bin, "
                                    "probe.rec/.idx, stats.json")
    parser.add_argument("--profile", choices=("ms1m", "mf2", "ijb", "megaface"), default="ms1m",
                        help="identity-size profile: ms1m (tens of images each) or mf2 (>=85%% under 10); or a "
                             "benchmark set: ijb (IJB-B/C layout: loose crops, landmarks, templates, pairs) or "
                             "megaface (probes/<identity>/ + distractors/)")
    parser.add_argument("--identities", type=int, default=None, metavar="N",
                        help="training identities (default 1000); ijb: identities (default 200); megaface: probe "
                             "identities (default 80)")
    parser.add_argument("--image-size", type=int, default=112, metavar="PX",
                        help="square image side (112); ijb: side of the aligned face inside each loose crop")
    parser.add_argument("--format", choices=("rec", "folder"), default="rec", dest="fmt",
                        help="train.rec + train.idx (insightface) or train/<identity>/<n>.jpg")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-identities", type=int, default=None, metavar="N",
                        help="identities held out for val.bin (default: identities/5, 50..2000)")
    parser.add_argument("--val-pairs", type=int, default=None, metavar="P",
                        help="verification pairs, rounded up to a multiple of 20 (default 6000, like LFW)")
    parser.add_argument("--probes-per-identity", type=int, default=1, metavar="K",
                        help="held-out images per training identity in probe.rec")
    parser.add_argument("--workers", type=int, default=1, help="rendering processes (output is identical)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    bench = parser.add_argument_group("benchmark sets (--profile ijb / megaface)")
    bench.add_argument("--ijb-name", choices=("ijbc", "ijbb"), default="ijbc",
                       help="file prefix of the IJB meta files (default ijbc)")
    bench.add_argument("--impostor-pairs", type=int, default=2_000_000, metavar="P",
                       help="ijb: impostor template pairs, all of them when there are fewer (default 2000000)")
    bench.add_argument("--images-per-identity", type=int, default=10, metavar="K",
                       help="megaface: images per probe identity (default 10)")
    bench.add_argument("--distractors", type=int, default=1000, metavar="N",
                       help="megaface: distractor images, one identity each (default 1000)")
    bench.add_argument("--first-identity", type=int, default=None, metavar="I",
                       help="ijb / megaface: first identity number (default 10000000 / 20000000, far from the "
                            "0..N that training sets use)")


_MAIN_PID = [0]


def _terminated(signum, frame):
    if os.getpid() != _MAIN_PID[0]:  # a forked rendering worker: die as before, the main process cleans up
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    print("dcq synth: terminated (SIGTERM); the unfinished files were removed", file=sys.stderr)
    raise SystemExit(128 + signum)  # unwinds through the writers' clean-up, as Ctrl-C does


def remove_abandoned(out) -> list[Path]:
    """Remove ``.synth-tmp-PID`` folders in ``out`` whose process no longer runs."""
    removed = []
    folder = Path(out)
    for path in folder.iterdir() if folder.is_dir() else []:
        match = re.fullmatch(r"\.synth-(?:tmp|old)-(\d+)", path.name)
        if match and path.is_dir() and not _running(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, another user's
        return True
    return True


def run_synth(args: argparse.Namespace) -> int:
    _MAIN_PID[0] = os.getpid()
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        remove_abandoned(args.out)
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    from dcq.data.synth.dataset import synthesize

    if args.profile in ("ijb", "megaface"):
        return _run_benchmark_set(args)
    if args.identities is None:
        args.identities = 1000
    if args.identities < 1:
        raise DcqError(f"--identities must be at least 1, got {args.identities}")
    if args.workers < 1:
        raise DcqError(f"--workers must be at least 1, got {args.workers}")
    st = synthesize(
        args.out, profile=args.profile, identities=args.identities, image_size=args.image_size,
        fmt=args.fmt, seed=args.seed, val_identities=args.val_identities, val_pairs=args.val_pairs,
        probes_per_identity=args.probes_per_identity, workers=args.workers, progress=not args.quiet,
    )
    train = "train.rec + train.idx" if args.fmt == "rec" else "train/<identity>/"
    print(f"wrote {args.out}: {train}, val.bin, probe.rec, stats.json")
    print(f"  profile {st['profile']}  seed {st['seed']}  {st['image_size']}x{st['image_size']} px")
    print(f"  train: {st['images']} images of {st['identities']} identities  "
          f"(median {st['median_images_per_identity']:g}, max {st['max_images_per_identity']}, "
          f"{100 * st['fraction_under_10']:.1f}% under 10 images)")
    print(f"  val.bin: {st['val_pairs']} pairs of {st['val_identities']} unseen identities; "
          f"probe.rec: {st['probes']} images")
    print(f"  rendered {st['rendered_images']} images in {st['seconds']:.1f} s "
          f"({st['images_per_second']:.0f} images/s with {args.workers} worker{'s' if args.workers > 1 else ''})")
    return 0


def _run_benchmark_set(args: argparse.Namespace) -> int:
    from dcq.data.synth import protocols as sp

    if args.workers < 1:
        raise DcqError(f"--workers must be at least 1, got {args.workers}")
    common = dict(image_size=args.image_size, seed=args.seed, workers=args.workers, progress=not args.quiet)
    if args.profile == "ijb":
        first = sp.IJB_FIRST_IDENTITY if args.first_identity is None else args.first_identity
        st = sp.synthesize_ijb(args.out, identities=200 if args.identities is None else args.identities,
                               name=args.ijb_name, impostor_pairs=args.impostor_pairs, first_identity=first, **common)
        print(f"wrote {args.out}: meta/{st['name']}_*.txt, loose_crop/, stats.json")
        print(f"  {st['images']} crops of {st['identities']} identities in {st['templates']} templates "
              f"({st['media']} media); {st['pairs']} pairs ({st['genuine_pairs']} genuine)")
    else:
        first = sp.MEGAFACE_FIRST_IDENTITY if args.first_identity is None else args.first_identity
        st = sp.synthesize_megaface(args.out, identities=80 if args.identities is None else args.identities,
                                    images_per_identity=args.images_per_identity, distractors=args.distractors,
                                    first_identity=first, **common)
        print(f"wrote {args.out}: probes/<identity>/, distractors/, stats.json")
        print(f"  {st['probe_images']} probe images of {st['probe_identities']} identities; "
              f"{st['distractors']} distractors")
    print(f"  identities {st['identity_range'][0]}..{st['identity_range'][1] - 1}, seed {st['seed']}, "
          f"{st['seconds']:.1f} s")
    return 0
