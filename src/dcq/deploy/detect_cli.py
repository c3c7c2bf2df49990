"""`dcq detect PHOTOS... --out landmarks.txt`: the five landmarks of every face, for `dcq align`.

One line per face in the layout `dcq.align.read_landmarks` reads, ``name x1 y1 ... x5 y5 score``
(left eye, right eye, nose tip, left and right mouth corners, in pixels of the upright photo). The
name is the path inside the folder given (or the path as given for a file named directly); when a
photo holds several faces they are ordered largest first, the first keeps the plain name and the
others are ``name#1``, ``name#2``, ... so that `dcq align --landmarks` and `dcq embed --landmarks`
take the largest face and `dcq align` writes a crop for each. Files that cannot be read or decoded
are listed (on the terminal and as ``# skipped`` comments at the end of the file), not fatal.

Also the ``--detect`` of `dcq embed --onnx` and `dcq gallery search` (`DetectedLandmarks`: the
largest face of each photo) and `dcq align` without ``--landmarks``. No torch once the detector's
ONNX files are in the cache (`dcq.deploy.mtcnn_weights`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dcq.atomic import atomic_write, ensure_writable
from dcq.deploy.detect import MIN_FACE, THRESHOLDS
from dcq.errors import DcqError

HEADER = "# name x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 score (dcq detect: MTCNN, facenet-pytorch 2.6.0 weights)\n"


def add_detector_options(parser, with_largest: bool = True) -> None:
    """``--min-face``, ``--threshold`` (and ``--largest``): how `dcq detect` and `dcq align` find faces."""
    parser.add_argument("--min-face", type=float, default=MIN_FACE, metavar="PX",
                        help=f"smallest face side looked for, in pixels (default {MIN_FACE}; larger is faster)")
    parser.add_argument("--threshold", type=float, default=THRESHOLDS[2], metavar="P",
                        help=f"final face score to reach, 0-1 (default {THRESHOLDS[2]})")
    if with_largest:
        parser.add_argument("--largest", action="store_true", help="keep only the largest face of each photo")


def configure_detect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="*", metavar="PHOTOS", help="photo files or folders (searched recursively)")
    parser.add_argument("--out", metavar="FILE", help="landmark file to write (the layout `dcq align --landmarks` "
                        "reads)")
    add_detector_options(parser)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: its choice)")
    parser.add_argument("--prepare", action="store_true", help="export the detector's networks to ONNX in the cache "
                        "now (needs torch, once; otherwise the first detection does it) and print where")


def open_detector(min_face: float = MIN_FACE, threshold: float = THRESHOLDS[2], threads: int | None = None):
    """A `FaceDetector` on the cached ONNX networks (exported first when the cache has none)."""
    from dcq.deploy.detect import FaceDetector

    if threads is not None and threads < 1:
        raise DcqError(f"--threads must be >= 1, got {threads}")
    return FaceDetector(min_face=min_face, threshold=threshold, threads=threads)


def no_face(detector) -> str:
    return f"no face found (smallest looked for: {detector.min_face:g} px, score >= {detector.thresholds[2]:g})"


class DetectedLandmarks:
    """path -> (5, 2) landmarks of the largest face in the photo (`BadImage` when there is none): the
    ``landmarks`` callable of `dcq.deploy.embed_job` and `dcq.deploy.photos.load_crop`."""

    def __init__(self, detector):
        self.detector = detector
        self.description = (f"detected: mtcnn (facenet-pytorch 2.6.0), min face {detector.min_face:g} px, "
                            f"threshold {detector.thresholds[2]:g}")

    def __call__(self, path: Path):
        from dcq.deploy.photos import BadImage, load_photo

        faces = self.detector.detect(load_photo(path))
        if not faces:
            raise BadImage(no_face(self.detector))
        return faces[0].landmarks


def landmark_names(files: list[Path], roots: list[str]) -> dict[Path, str]:
    """The name of each photo in the landmark file: its path inside the folder given, or the path as
    given (also when two folders hold the same inside path), as `LandmarkLookup` finds it."""
    folders = [Path(r) for r in roots if Path(r).is_dir()]
    names: dict[Path, str] = {}
    taken: set[str] = set()
    for f in files:
        name = f.as_posix()
        for root in folders:
            try:
                name = f.relative_to(root).as_posix()
                break
            except ValueError:
                pass
        if name in taken:
            name = f.as_posix()
        taken.add(name)
        names[f] = name
    return names


def face_line(name: str, face) -> str:
    points = " ".join(f"{v:.2f}" for v in face.landmarks.reshape(-1))
    return f"{name} {points} {face.score:.5f}\n"


def detect_photos(detector, files: list[Path], names: dict[Path, str], largest: bool = False,
                  progress: bool = False):
    """(landmark file lines, photos without a face, [(path, reason)] of files skipped)."""
    from tqdm import tqdm

    from dcq.deploy.photos import BadImage, load_photo

    lines, empty, skipped = [], [], []
    for f in tqdm(files, desc="detecting", unit="photo", dynamic_ncols=True, disable=not progress):
        name = names[f]
        if any(c.isspace() for c in name) or name.startswith("#"):
            skipped.append((f, "its name has white space or starts with '#', which the landmark layout cannot "
                               "hold; rename the file"))
            continue
        try:
            faces = detector.detect(load_photo(f))
        except BadImage as exc:
            skipped.append((f, str(exc)))
            continue
        if not faces:
            empty.append(f)
        for k, face in enumerate(faces[:1] if largest else faces):
            lines.append(face_line(name if k == 0 else f"{name}#{k}", face))
    return lines, empty, skipped


def run_detect(args: argparse.Namespace) -> int:
    from dcq.deploy.mtcnn_weights import detector_files
    from dcq.data.folder import collect_images

    if args.prepare:
        files = detector_files()
        print(f"detector ready: {', '.join(str(p) for p in files.values())}")
        if not args.images:
            return 0
    if not args.images or not args.out:
        raise DcqError("give photos and a landmark file: dcq detect PHOTOS... --out landmarks.txt")
    out = Path(args.out)
    ensure_writable(out)
    files = collect_images(args.images)
    detector = open_detector(args.min_face, args.threshold, args.threads)
    lines, empty, skipped = detect_photos(detector, files, landmark_names(files, args.images), args.largest,
                                          progress=sys.stderr.isatty())
    notes = "".join(f"# skipped {f}: {reason}\n" for f, reason in skipped)
    atomic_write(out, lambda fh: fh.write((HEADER + "".join(lines) + notes).encode()))
    print(f"wrote {out}: {len(lines)} faces in {len(files) - len(empty) - len(skipped)} of {len(files)} photos; "
          f"{len(empty)} without a face (none of at least {args.min_face:g} px scoring {args.threshold:g}); "
          f"{len(skipped)} files skipped" + (":" if skipped else ""))
    for f, reason in skipped[:10]:
        print(f"  {f}: {reason}")
    if len(skipped) > 10:
        print(f"  ... {len(skipped) - 10} more, listed at the end of {out}")
    return 0


def detected_crops(detector, path: Path, name: Path, size: int, largest: bool = False):
    """[(crop name, aligned uint8 crop)] of the faces in the photo at ``path``, largest first: ``name``
    for the first, ``name`` with ``#1``, ``#2``, ... before its suffix for the others. `BadImage` when
    the photo cannot be read or holds no face."""
    from dcq.align import align_face
    from dcq.deploy.photos import BadImage, load_photo

    photo = load_photo(path)
    faces = detector.detect(photo)
    if not faces:
        raise BadImage(no_face(detector))
    return [(name if k == 0 else name.with_name(f"{name.stem}#{k}{name.suffix}"), align_face(photo, f.landmarks, size))
            for k, f in enumerate(faces[:1] if largest else faces)]
