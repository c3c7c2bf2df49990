"""The `--onnx` path of `dcq embed`: options and the run, with no torch import.

`dcq.eval.cli.run_embed` hands over to `run_onnx_embed` before anything loads torch, so a machine
that only serves a model needs numpy, Pillow and onnxruntime.
"""

from __future__ import annotations

import argparse
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


def run_onnx_embed(args: argparse.Namespace) -> int:
    from dcq.deploy.embed_job import embed_collection
    from dcq.eval.cli import collect_images

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
                                aligned_by=str(args.landmarks) if args.landmarks else None,
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
