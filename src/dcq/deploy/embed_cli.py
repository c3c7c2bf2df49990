"""`dcq embed`: embeddings of image files, with a checkpoint (one ``.npy``) or an ONNX model (resumable shards).

`run_embed` hands an ``--onnx`` run to `run_onnx_embed` before anything loads torch, so a machine
that only serves a model needs numpy, Pillow and onnxruntime.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dcq.errors import DcqError, printable


def add_onnx_options(parser: argparse.ArgumentParser) -> None:
    """The options `dcq embed` takes for an ONNX model (CKPT is then left out)."""
    group = parser.add_argument_group("ONNX model (dcq embed --onnx MODEL IMAGES... --out DIR)")
    group.add_argument("--onnx", metavar="MODEL", help="embed with this .onnx (onnxruntime, no torch) instead of "
                       "a checkpoint; --out is then a folder of .npy shards + manifest.json that a stopped run "
                       "continues")
    group.add_argument("--landmarks", metavar="FILE", help="with --onnx: the images are photos, aligned by the 5 "
                           "landmarks in FILE ('name x1 y1 ... x5 y5 [score]' lines)")
    group.add_argument("--detect", action="store_true", help="with --onnx: the images are photos; find the faces "
                       "(`dcq detect`'s detector) and align the largest of each")
    group.add_argument("--shard-size", type=int, default=65536, help="with --onnx: rows per .npy shard "
                       "(default 65536)")
    group.add_argument("--threads", type=int, default=None, help="with --onnx: onnxruntime threads "
                       "(default: onnxruntime's choice)")


def open_embedder(model, threads: int | None = None, device: str = "cpu"):
    """An `OnnxEmbedder` on the CPU, or on CUDA when ``device`` asks and onnxruntime has it."""
    import onnxruntime as ort

    from dcq.deploy.onnx_model import OnnxEmbedder

    if threads is not None and threads < 1:
        raise DcqError(f"--threads must be >= 1, got {threads}")
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise DcqError(f"--device {device}: this onnxruntime has no CUDA provider; install onnxruntime-gpu "
                           "or use --device cpu")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    elif device != "cpu":
        raise DcqError(f"--device {device}: with --onnx use cpu or cuda")
    return OnnxEmbedder(model, providers=providers, threads=threads)


def landmark_lookup(landmark_file, roots):
    """A path -> landmarks callable for ``landmark_file`` (None when not given)."""
    if landmark_file is None:
        return None
    from dcq.align import read_landmarks
    from dcq.deploy.photos import LandmarkLookup

    return LandmarkLookup(read_landmarks(landmark_file), [Path(r) for r in roots])


def detected_landmarks(landmark_file, threads: int | None = None):
    """For ``--detect``: the path -> landmarks callable that runs the face detector, and its description."""
    from dcq.deploy.detect_cli import DetectedLandmarks, open_detector

    if landmark_file is not None:
        raise DcqError("give either --landmarks FILE or --detect, not both")
    lookup = DetectedLandmarks(open_detector(threads=threads))
    return lookup, lookup.description


def run_onnx_embed(args: argparse.Namespace) -> int:
    from dcq.deploy.embed_job import embed_collection
    from dcq.data.folder import collect_images

    inputs = ([args.checkpoint] if args.checkpoint else []) + list(args.images)
    if not inputs:
        raise DcqError("no images: dcq embed --onnx MODEL IMAGES... --out DIR")
    out = Path(args.out)
    if out.suffix == ".npy" or out.is_file():
        raise DcqError(f"--out {out}: with --onnx, --out is a folder (shards + manifest.json), e.g. --out "
                       f"{out.with_suffix('')}")
    if args.batch_size < 1:
        raise DcqError(f"--batch-size must be >= 1, got {args.batch_size}")
    lookup = landmark_lookup(args.landmarks, inputs)
    aligned_by = str(args.landmarks) if args.landmarks else None
    if args.detect:
        lookup, aligned_by = detected_landmarks(args.landmarks, args.threads)
    files = collect_images(inputs)
    embedder = open_embedder(args.onnx, args.threads, args.device)
    flip = not args.no_flip
    advice = embedder.metadata.get("dcq.flip_test")
    if advice == "true" and not flip:
        print("note: the model's metadata recommends the flip test; --no-flip gives other embeddings",
              file=sys.stderr)
    print(f"model: {printable(embedder.path)} ({embedder.image_size} px, {embedder.embedding_size}-d, "
          f"{embedder.metadata.get('dcq.encoder', 'no dcq metadata: insightface preprocessing')}); "
          f"{len(files)} images")
    manifest = embed_collection(embedder, files, out, batch_size=args.batch_size, flip=flip,
                                shard_size=args.shard_size, landmarks=lookup,
                                aligned_by=aligned_by,
                                progress=sys.stderr.isatty())
    failed = manifest["failed"]
    print(f"{printable(out)}: {manifest['rows']} embeddings in {len(manifest['shards'])} shards "
          f"({printable(out / 'manifest.json')}); "
          f"{len(failed)} files could not be embedded" + (":" if failed else ""))
    for f in failed[:10]:
        print(f"  {printable(f['path'])}: {printable(f['reason'])}")
    if len(failed) > 10:
        print(f"  ... {len(failed) - 10} more in {printable(out / 'manifest.json')} ('failed')")
    return 0


def configure_embed(parser: argparse.ArgumentParser) -> None:
    from dcq.encoders import add_model_options

    parser.usage = ("%(prog)s CKPT IMAGES... --out FILE.npy [options]\n"
                    "       %(prog)s --onnx MODEL IMAGES... --out DIR [options]")
    add_model_options(parser)
    parser.add_argument("images", nargs="*", metavar="IMAGES", help="image files or folders (searched recursively)")
    parser.add_argument("--out", required=True, metavar="FILE.npy",
                        help="(N, d) float32 embeddings; image paths go to FILE.txt beside it, one per line")
    add_onnx_options(parser)


def run_embed(args: argparse.Namespace) -> int:
    if args.onnx:  # before anything imports torch
        return run_onnx_embed(args)
    if not args.images:
        raise DcqError("no images: dcq embed CKPT IMAGES... --out FILE.npy")
    import numpy as np
    from tqdm import tqdm

    from dcq.atomic import atomic_write, ensure_writable
    from dcq.data.folder import collect_images, load_image
    from dcq.encoders import CheckpointEncoder, torch_device

    out = Path(args.out)
    if out.suffix != ".npy":
        raise DcqError(f"--out {out}: must end in .npy (names are written to {out.with_suffix('.txt').name})")
    files = collect_images(args.images)
    for f in files:  # one name per line in NAME.txt: a name that breaks lines would shift every later row
        if len(str(f).splitlines()) > 1 or str(f).endswith(("\n", "\r")):
            raise DcqError(f"{printable(f)}: a file name with a line break cannot be listed one per line in "
                           f"{out.with_suffix('.txt').name}; rename it, or use `dcq embed --onnx` (JSON names)")
    model = CheckpointEncoder(args.checkpoint, torch_device(args.device, args.batch_size), args.batch_size,
                              flip=not args.no_flip)
    names_path = out.with_suffix(".txt")
    ensure_writable(out)
    ensure_writable(names_path)
    print(model.describe())
    emb = None
    with tqdm(total=len(files), desc="embedding", unit="img", dynamic_ncols=True,
              disable=not sys.stderr.isatty()) as bar:
        for start in range(0, len(files), args.batch_size):
            batch = files[start:start + args.batch_size]
            e = model.embed(np.stack([load_image(f, model.image_size) for f in batch]))
            if emb is None:
                emb = np.empty((len(files), e.shape[1]), dtype=np.float32)
            emb[start:start + len(batch)] = e
            bar.update(len(batch))
    atomic_write(out, lambda f: np.save(f, emb, allow_pickle=False))
    atomic_write(names_path, lambda f: f.write(b"".join(os.fsencode(p) + b"\n" for p in files)))  # exact bytes
    print(f"wrote {out} ({emb.shape[0]} x {emb.shape[1]} float32) and {names_path}")
    return 0
