"""`dcq eval`, `dcq embed`, `dcq verify`: evaluation commands on a checkpoint.

All three use the checkpoint's *evaluation encoder*: the weight generator (the EMA copy) when
the checkpoint has one, as the DCQ paper evaluates, else the feature extractor; embeddings are
flip-test, L2-normalised (``--no-flip`` turns the flip off). `dcq eval` also takes an ``.onnx``
model (run by onnxruntime, `dcq.eval.embedder`) for ``--bin``, ``--ijb`` and ``--megaface``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from dcq.atomic import atomic_write, ensure_writable
from dcq.errors import DcqError, printable
from dcq.tables import fmt_metric, markdown_table

TABLE_FARS = ("1e-4", "1e-3", "1e-2", "1e-1")


# --------------------------------------------------------------------------- shared helpers
def _add_common(parser: argparse.ArgumentParser, model_help: str = "checkpoint .pt written by `dcq train`") -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help=model_help)
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default cpu)")
    parser.add_argument("--no-flip", action="store_true", help="no flip test (embed only the image itself)")


def _device(name: str):
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise DcqError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DcqError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return dev


def _checked_device(args):
    if args.batch_size < 1:
        raise DcqError(f"--batch-size must be >= 1, got {args.batch_size}")
    return _device(args.device)


def _encoder(args) -> tuple:
    """(encoder, info, checkpoint dict, device)."""
    from dcq.eval.pipeline import load_encoder

    device = _checked_device(args)
    encoder, info, ckpt = load_encoder(args.checkpoint, device)
    return encoder, info, ckpt, device


def encoder_description(info: dict) -> str:
    if info.get("which") == "weight_generator":
        what = "weight generator (EMA) embeddings, as in the DCQ paper"
    else:
        what = "feature extractor embeddings (the checkpoint has no weight generator)"
    return f"encoder: {what}; {info.get('backbone')}, {info.get('embedding_size')}-d, {info.get('image_size')} px"


def _write_json(path: Path, data) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


def verification_table(results: dict) -> str:
    head = ["set", "pairs", "accuracy", "std", "threshold"] + [f"TAR@FAR={k}" for k in TABLE_FARS]
    rows = []
    for name, r in results.items():
        cells = [name, str(r["pairs"])] + [fmt_metric(r[k]) for k in ("accuracy", "accuracy_std", "threshold")]
        rows.append(cells + [fmt_metric(r["tar_at_far"].get(k)) for k in TABLE_FARS])
    return markdown_table(head, rows)


# --------------------------------------------------------------------------- dcq eval
def configure_eval(parser: argparse.ArgumentParser) -> None:
    _add_common(parser, "checkpoint .pt written by `dcq train`, or an .onnx model (dcq's export or insightface's; "
                "--bin, --ijb and --megaface)")
    parser.add_argument("--bin", nargs="+", action="extend", default=[], metavar="FILE",
                        help="verification .bin files (lfw.bin, cfp_fp.bin, ...); set name = file stem")
    parser.add_argument("--json", metavar="OUT", help="write {set: {accuracy, accuracy_std, threshold, pairs, "
                        "tar_at_far}} to OUT; long-tail / identification results go to OUT's stem + "
                        ".longtail.json")
    parser.add_argument("--plots", metavar="DIR", help="write roc.png (and longtail.png) into DIR")
    parser.add_argument("--dataset", metavar="DIR", help="dataset folder with train + probe set (`dcq synth` "
                        "output): long-tail report and identification of probes against identity centres")
    parser.add_argument("--distractors", metavar="FILE.npy", help="with --dataset: distractor embeddings "
                        "(N, d) from `dcq embed`, added to the identification gallery (MegaFace style)")
    parser.add_argument("--folds", type=int, default=10, help="verification folds (default 10)")
    bench = parser.add_argument_group("benchmark protocols (CKPT may also be an .onnx model)")
    bench.add_argument("--ijb", metavar="DIR", help="IJB-B/C 1:1 template verification on insightface's layout "
                       "(DIR/meta/<name>_*.txt, DIR/loose_crop/); JSON key \"ijb\"")
    bench.add_argument("--ijb-name", choices=("ijbc", "ijbb"), default="ijbc",
                       help="which IJB set's meta files (default ijbc)")
    bench.add_argument("--megaface", metavar="DIR", help="MegaFace challenge-1 identification of the aligned "
                       "probe set DIR/<identity>/<image> (or DIR/probes/...); JSON key \"megaface\"")
    bench.add_argument("--megaface-distractors", nargs="+", metavar="FILE.npy|DIR",
                       help="distractor embeddings with the same model: .npy files from `dcq embed CKPT` or the "
                       "shard folder of `dcq embed --onnx` (all read as one, in order; memory-mapped)")
    bench.add_argument("--megaface-sizes", metavar="N,N,...",
                       help="distractor-set sizes (default 10,100,... up to all of them)")


def _set_names(bins: list[str]) -> list[str]:
    names = [Path(b).stem for b in bins]
    seen = set()
    for b, n in zip(bins, names):
        if n in seen:
            raise DcqError(f"two --bin files are both named {n!r} ({b}); the JSON keys are file stems, "
                           "rename one of them")
        seen.add(n)
    return names


def run_eval(args: argparse.Namespace) -> int:
    from dcq.eval.protocol_cli import (_check_protocol_args, _dataset_report, _load_distractors, _plot_protocols,
                                       _protocols, _run_eval_model)
    from dcq.eval.pipeline import evaluate_checkpoint
    from dcq.eval.verification import roc_curve_points

    from dcq.eval.embedder import is_onnx

    if not args.bin and not args.dataset and not args.ijb and not args.megaface:
        raise DcqError("nothing to evaluate: pass --bin FILE (verification pairs), --dataset DIR, --ijb DIR "
                       "and/or --megaface DIR")
    if args.distractors and not args.dataset:
        raise DcqError("--distractors needs --dataset DIR (its probe set is identified against them)")
    _check_protocol_args(args)
    if is_onnx(args.checkpoint):
        return _run_eval_model(args)
    _set_names(args.bin)
    json_path = Path(args.json) if args.json else None
    if json_path is not None and json_path.is_dir():
        raise DcqError(f"--json {json_path} is a directory; give a file name such as metrics.json")
    for b in args.bin:
        if not Path(b).is_file():
            raise DcqError(f"--bin {b}: file not found")
    distractors = _load_distractors(args.distractors) if args.distractors else None
    device = _checked_device(args)
    # Fail before the work, not after it, when a result cannot be written.
    if json_path is not None:
        ensure_writable(json_path)
        if args.dataset:
            ensure_writable(json_path.with_name(json_path.stem + ".longtail.json"))
    if args.plots:
        ensure_writable(Path(args.plots) / "roc.png")
    ev = evaluate_checkpoint(args.checkpoint, args.bin, args.dataset, batch_size=args.batch_size, device=device,
                             flip=not args.no_flip, n_folds=args.folds, progress=sys.stderr.isatty())
    print(encoder_description(ev.info))
    results = ev.verification
    curves = {name: roc_curve_points(scores, issame)[:2] for name, (scores, issame) in ev.scores.items()
              if issame.any() and not issame.all()}
    if results:
        print(verification_table(results))
    extra = _dataset_report(ev, distractors) if args.dataset else {}
    protocols, ijb_curves = {}, {}
    if args.ijb or args.megaface:
        from dcq.eval.embedder import CheckpointModel

        model = CheckpointModel.from_loaded(ev.encoder, ev.info, device, args.batch_size, not args.no_flip)
        protocols, ijb_curves = _protocols(args, model)
    if json_path is not None:
        if results or protocols:
            _write_json(json_path, {**results, **protocols})
            print(f"wrote {json_path}")
        if extra:
            lt_path = json_path.with_name(json_path.stem + ".longtail.json")
            _write_json(lt_path, extra)
            print(f"wrote {lt_path}")
    if args.plots:
        from dcq.eval.plots import plot_longtail, plot_roc

        out = Path(args.plots)
        if curves:
            print(f"wrote {plot_roc(curves, out / 'roc.png')}")
        if extra.get("longtail"):
            print(f"wrote {plot_longtail({ev.info['which']: extra['longtail']['rows']}, out / 'longtail.png')}")
        _plot_protocols(ijb_curves, out)
    return 0


# --------------------------------------------------------------------------- dcq embed
def configure_embed(parser: argparse.ArgumentParser) -> None:
    from dcq.deploy.embed_cli import add_onnx_options

    parser.usage = ("%(prog)s CKPT IMAGES... --out FILE.npy [options]\n"
                    "       %(prog)s --onnx MODEL IMAGES... --out DIR [options]")
    _add_common(parser)
    parser.add_argument("images", nargs="*", metavar="IMAGES", help="image files or folders (searched recursively)")
    parser.add_argument("--out", required=True, metavar="FILE.npy",
                        help="(N, d) float32 embeddings; image paths go to FILE.txt beside it, one per line")
    add_onnx_options(parser)


def collect_images(paths: list[str]) -> list[Path]:
    """Image files named directly, then those under each folder (recursive, sorted)."""
    from dcq.data.folder import IMAGE_EXTENSIONS, is_image_file

    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f.name)
                            and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif p.is_file():
            found.append(p)
        else:
            raise DcqError(f"{p}: no such image file or folder")
    if not found:
        raise DcqError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {' '.join(paths)}")
    return found


def run_embed(args: argparse.Namespace) -> int:
    if args.onnx:  # before anything imports torch
        from dcq.deploy.embed_cli import run_onnx_embed

        return run_onnx_embed(args)
    if not args.images:
        raise DcqError("no images: dcq embed CKPT IMAGES... --out FILE.npy")
    import numpy as np
    from tqdm import tqdm

    from dcq.data.transforms import decode_image
    from dcq.eval.embedding import embed_images

    out = Path(args.out)
    if out.suffix != ".npy":
        raise DcqError(f"--out {out}: must end in .npy (names are written to {out.with_suffix('.txt').name})")
    files = collect_images(args.images)
    for f in files:  # one name per line in NAME.txt: a name that breaks lines would shift every later row
        if len(str(f).splitlines()) > 1 or str(f).endswith(("\n", "\r")):
            raise DcqError(f"{printable(f)}: a file name with a line break cannot be listed one per line in "
                           f"{out.with_suffix('.txt').name}; rename it, or use `dcq embed --onnx` (JSON names)")
    encoder, info, _, device = _encoder(args)
    names_path = out.with_suffix(".txt")
    ensure_writable(out)
    ensure_writable(names_path)
    print(encoder_description(info))
    size = info["image_size"]
    emb = None
    with tqdm(total=len(files), desc="embedding", unit="img", dynamic_ncols=True,
              disable=not sys.stderr.isatty()) as bar:
        for start in range(0, len(files), args.batch_size):
            batch = files[start:start + args.batch_size]
            images = np.stack([decode_image(_read(f), size, where=str(f)) for f in batch])
            e = embed_images(encoder, images, batch_size=args.batch_size, flip=not args.no_flip, device=device)
            if emb is None:
                emb = np.empty((len(files), e.shape[1]), dtype=np.float32)
            emb[start:start + len(batch)] = e
            bar.update(len(batch))
    atomic_write(out, lambda f: np.save(f, emb, allow_pickle=False))
    atomic_write(names_path, lambda f: f.write(b"".join(os.fsencode(p) + b"\n" for p in files)))  # exact bytes
    print(f"wrote {out} ({emb.shape[0]} x {emb.shape[1]} float32) and {names_path}")
    return 0


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DcqError(f"{path}: cannot read image ({exc.strerror or exc})") from None


# --------------------------------------------------------------------------- dcq verify
def configure_verify(parser: argparse.ArgumentParser) -> None:
    _add_common(parser)
    parser.add_argument("image_a", metavar="A", help="first face image")
    parser.add_argument("image_b", metavar="B", help="second face image")
    parser.add_argument("--threshold", type=float, default=None,
                        help="cosine threshold (default: the one stored in the checkpoint by its last evaluation)")


def run_verify(args: argparse.Namespace) -> int:
    import numpy as np

    from dcq.data.transforms import decode_image
    from dcq.eval.embedding import embed_images

    if args.threshold is not None and not math.isfinite(args.threshold):
        raise DcqError(f"--threshold {args.threshold}: give a finite cosine threshold, e.g. 0.3")
    for p in (args.image_a, args.image_b):
        if not Path(p).is_file():
            raise DcqError(f"{p}: image not found")
    encoder, info, ckpt, device = _encoder(args)
    threshold = args.threshold if args.threshold is not None else ckpt.get("threshold")
    if threshold is None:
        raise DcqError(f"{args.checkpoint} stores no verification threshold (it was trained without eval_bins); "
                       "pass --threshold T, e.g. the 'threshold' that `dcq eval --json` reports")
    try:
        threshold = float(threshold)
    except (TypeError, ValueError):
        threshold = float("nan")
    if not math.isfinite(threshold):
        raise DcqError(f"{args.checkpoint} stores an unusable threshold ({ckpt.get('threshold')!r}); "
                       "pass --threshold T, e.g. the 'threshold' that `dcq eval --json` reports")
    size = info["image_size"]
    images = np.stack([decode_image(_read(Path(p)), size, where=p) for p in (args.image_a, args.image_b)])
    emb = embed_images(encoder, images, batch_size=2, flip=not args.no_flip, device=device)
    sim = float(np.dot(emb[0].astype(np.float64), emb[1].astype(np.float64)))
    verdict = "same" if sim >= threshold else "different"
    source = "given" if args.threshold is not None else "from the checkpoint"
    print(encoder_description(info))
    print(f"cosine similarity: {sim:.4f}")
    print(f"{verdict} (threshold {threshold:.4f}, {source})")
    return 0
