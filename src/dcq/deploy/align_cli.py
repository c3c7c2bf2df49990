"""`dcq align IMAGES... --landmarks FILE --out DIR`: aligned face crops from photos.

Each photo with a line in the landmark file is warped by `dcq.align.align_face` to the ArcFace
template and written as a lossless PNG under DIR (the path inside its input folder, or the file
name for a file given directly, with ``.png``), so the crops embed exactly as the on-the-fly
alignment of ``dcq embed --onnx --landmarks``. Files without landmarks or that cannot be decoded
are listed (and in DIR/failed.txt, one ``path<TAB>reason`` per line, the path with control
characters and bytes that are not UTF-8 escaped so that no name can split a line), not fatal.
Without ``--landmarks`` the faces are found by `dcq detect`'s detector first: one crop per face
(``NAME.png`` for the largest, ``NAME#1.png``, ... for the others; ``--largest`` keeps one). No torch.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from dcq.atomic import atomic_write
from dcq.errors import DcqError, printable


def configure_align(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGES", help="photo files or folders (searched recursively)")
    from dcq.deploy.detect_cli import add_detector_options

    parser.add_argument("--landmarks", metavar="FILE",
                        help="'name x1 y1 ... x5 y5 [score]' lines (insightface's layout, or `dcq detect`'s): left "
                             "eye, right eye, nose, left and right mouth corners; name = the path as given, inside "
                             "its folder, or the file name. Without it the faces are detected")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the aligned PNG crops")
    parser.add_argument("--size", type=int, default=112, help="crop size in pixels (default 112)")
    add_detector_options(parser.add_argument_group("face detection (without --landmarks)"))


def output_name(path: Path, roots: list[Path]) -> Path:
    """Where the crop of ``path`` goes inside the output folder."""
    for root in roots:
        if root.is_dir():
            try:
                return path.relative_to(root).with_suffix(".png")
            except ValueError:
                pass
    return Path(path.name).with_suffix(".png")


def run_align(args: argparse.Namespace) -> int:
    from PIL import Image

    from dcq.align import reference_points
    from dcq.deploy.detect_cli import detected_crops, open_detector
    from dcq.deploy.embed_cli import landmark_lookup
    from dcq.deploy.photos import BadImage, load_crop
    from dcq.data.folder import collect_images

    reference_points(args.size)  # checks the size
    roots = [Path(p) for p in args.images]
    lookup = landmark_lookup(args.landmarks, args.images)
    detector = None if lookup else open_detector(args.min_face, args.threshold)
    files = collect_images(args.images)
    out = Path(args.out)
    if out.is_file():
        raise DcqError(f"--out {out} is a file; give a folder")
    targets: dict[Path, Path] = {}
    for f in files:
        name = output_name(f, roots)
        if name in targets:
            raise DcqError(f"{printable(f)} and {printable(targets[name])} would both be written to "
                           f"{printable(out / name)}; rename one of them")
        targets[name] = f
    failed = []
    written = 0
    for name, f in targets.items():
        try:
            crops = (detected_crops(detector, f, name, args.size, args.largest) if detector
                     else [(name, load_crop(f, args.size, lookup(f)))])
        except BadImage as exc:
            failed.append(f"{printable(f)}\t{printable(exc)}")
            continue
        for crop_name, crop in crops:
            buffer = io.BytesIO()
            Image.fromarray(crop).save(buffer, format="PNG")
            atomic_write(out / crop_name, lambda fh: fh.write(buffer.getvalue()))
            written += 1
    if failed:
        atomic_write(out / "failed.txt", lambda fh: fh.write("".join(line + "\n" for line in failed).encode()))
    print(f"wrote {written} aligned {args.size}x{args.size} crops to {printable(out)}"
          + (f"; {len(failed)} files skipped (listed in {printable(out / 'failed.txt')}):" if failed else ""))
    for line in failed[:10]:
        print("  " + line.replace("\t", ": "))
    return 0
