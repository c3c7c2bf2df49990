"""`dcq eval` and `dcq verify`: evaluation commands.

`dcq eval` takes a checkpoint (its *evaluation encoder*: the weight generator, the EMA copy, when it
has one, as the DCQ paper evaluates, else the feature extractor) or an ``.onnx`` model, and runs
both through the one pipeline (`dcq.eval.pipeline.evaluate_model`): ``.bin`` verification, the
dataset's long-tail report and identification, IJB and MegaFace. Embeddings are flip-test
(``--no-flip`` turns the flip off). `dcq embed` lives in `dcq.deploy.embed_cli`.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from dcq.atomic import ensure_writable, write_json
from dcq.encoders import add_model_options, is_onnx, torch_device
from dcq.errors import DcqError


# --------------------------------------------------------------------------- dcq eval
def configure_eval(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser, "checkpoint .pt written by `dcq train`, or an .onnx model (dcq's export or "
                      "insightface's), evaluated by the same code")
    parser.add_argument("--bin", nargs="+", action="extend", default=[], metavar="FILE",
                        help="verification .bin files (lfw.bin, cfp_fp.bin, ...); set name = file stem")
    parser.add_argument("--json", metavar="OUT", help="write {set: {accuracy, accuracy_std, threshold, pairs, "
                        "tar_at_far}} to OUT; long-tail / identification results go to OUT's stem + "
                        ".longtail.json")
    parser.add_argument("--plots", metavar="DIR", help="write roc.png (and longtail.png) into DIR")
    parser.add_argument("--dataset", metavar="DIR", help="dataset folder with train + probe set (`dcq synth` "
                        "output): long-tail report and identification of probes against identity centres")
    parser.add_argument("--distractors", metavar="FILE.npy|DIR", help="with --dataset: distractor embeddings "
                        "from `dcq embed` (an (N, d) .npy or a --onnx shard folder), added to the identification "
                        "gallery (MegaFace style)")
    parser.add_argument("--folds", type=int, default=10, help="verification folds (default 10)")
    bench = parser.add_argument_group("benchmark protocols")
    bench.add_argument("--ijb", metavar="DIR", help="IJB-B/C 1:1 template verification on insightface's layout "
                       "(DIR/meta/<name>_*.txt, DIR/loose_crop/); JSON key \"ijb\"")
    bench.add_argument("--ijb-name", choices=("ijbc", "ijbb"), default="ijbc",
                       help="which IJB set's meta files (default ijbc)")
    bench.add_argument("--ijb-unit-crops", action="store_true",
                       help="pool unit crop vectors (insightface's test mode N0D1F1) instead of raw ones (N1D1F1, "
                       "the mode of its published tables; the default)")
    bench.add_argument("--megaface", metavar="DIR", help="MegaFace challenge-1 identification of the aligned "
                       "probe set DIR/<identity>/<image> (or DIR/probes/...); JSON key \"megaface\"")
    bench.add_argument("--megaface-distractors", nargs="+", metavar="FILE.npy|DIR",
                       help="distractor embeddings with the same model: .npy files from `dcq embed CKPT` or the "
                       "shard folder of `dcq embed --onnx` (all read as one, in order; memory-mapped)")
    bench.add_argument("--megaface-sizes", metavar="N,N,...",
                       help="distractor-set sizes (default 10,100,... up to all of them)")
    bench.add_argument("--megaface-index", choices=("auto", "exact", "flat", "ivf", "ivfpq", "hnsw"), default="auto",
                       help="auto (default): sets of 100,000 distractors or more are searched through a faiss IVF "
                       "index when faiss is installed (recall against exact search in the JSON), smaller ones "
                       "exactly; exact: never an index; flat/ivf/ivfpq/hnsw: that index for every size")
    bench.add_argument("--megaface-k", type=int, default=1000, metavar="K",
                       help="with an index: distractors retrieved per probe; the CMC is reported up to rank K")


def run_eval(args: argparse.Namespace) -> int:
    from dcq.encoders import open_encoder
    from dcq.eval.pipeline import evaluate_model
    from dcq.eval.protocol_cli import (check_embedded_by, check_protocol_args, dataset_report, plot_protocols,
                                       protocols, read_distractors, set_names, verification_table)
    from dcq.eval.verification import roc_curve_points

    if not args.bin and not args.dataset and not args.ijb and not args.megaface:
        raise DcqError("nothing to evaluate: pass --bin FILE (verification pairs), --dataset DIR, --ijb DIR "
                       "and/or --megaface DIR")
    if args.distractors and not args.dataset:
        raise DcqError("--distractors needs --dataset DIR (its probe set is identified against them)")
    check_protocol_args(args)
    set_names(args.bin)
    json_path = Path(args.json) if args.json else None
    if json_path is not None and json_path.is_dir():
        raise DcqError(f"--json {json_path} is a directory; give a file name such as metrics.json")
    for b in args.bin:
        if not Path(b).is_file():
            raise DcqError(f"--bin {b}: file not found")
    distractors = read_distractors(args.distractors, "--distractors") if args.distractors else None
    device = args.device if is_onnx(args.checkpoint) else torch_device(args.device, args.batch_size)
    # Fail before the work, not after it, when a result cannot be written.
    if json_path is not None:
        ensure_writable(json_path)
        if args.dataset:
            ensure_writable(json_path.with_name(json_path.stem + ".longtail.json"))
    if args.plots:
        ensure_writable(Path(args.plots) / "roc.png")
    model = open_encoder(args.checkpoint, device=device, batch_size=args.batch_size, flip=not args.no_flip)
    if distractors is not None:
        check_embedded_by(model, distractors, "--distractors")
    ev = evaluate_model(model, args.bin, args.dataset, n_folds=args.folds, progress=sys.stderr.isatty())
    print(model.describe())
    results = ev.verification
    curves = {name: roc_curve_points(scores, issame)[:2] for name, (scores, issame) in ev.scores.items()
              if issame.any() and not issame.all()}
    if results:
        print(verification_table(results))
    extra = dataset_report(ev, distractors.array() if distractors is not None else None) if args.dataset else {}
    found, ijb_curves = protocols(args, model)
    if json_path is not None:
        if results or found:
            write_json(json_path, {**results, **found})
            print(f"wrote {json_path}")
        if extra:
            lt_path = json_path.with_name(json_path.stem + ".longtail.json")
            write_json(lt_path, extra)
            print(f"wrote {lt_path}")
    if args.plots:
        from dcq.eval.plots import plot_longtail, plot_roc

        out = Path(args.plots)
        if curves:
            print(f"wrote {plot_roc(curves, out / 'roc.png')}")
        if extra.get("longtail"):
            print(f"wrote {plot_longtail({ev.info['which']: extra['longtail']['rows']}, out / 'longtail.png')}")
        plot_protocols(ijb_curves, out)
    return 0


# --------------------------------------------------------------------------- dcq verify
def configure_verify(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.add_argument("image_a", metavar="A", help="first face image")
    parser.add_argument("image_b", metavar="B", help="second face image")
    parser.add_argument("--threshold", type=float, default=None,
                        help="cosine threshold (default: the one stored in the checkpoint by its last evaluation)")


def run_verify(args: argparse.Namespace) -> int:
    import numpy as np

    from dcq.data.folder import load_image
    from dcq.encoders import CheckpointEncoder

    if args.threshold is not None and not math.isfinite(args.threshold):
        raise DcqError(f"--threshold {args.threshold}: give a finite cosine threshold, e.g. 0.3")
    for p in (args.image_a, args.image_b):
        if not Path(p).is_file():
            raise DcqError(f"{p}: image not found")
    model = CheckpointEncoder(args.checkpoint, torch_device(args.device, args.batch_size), batch_size=2,
                              flip=not args.no_flip)
    ckpt = model.checkpoint
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
    emb = model.embed(np.stack([load_image(p, model.image_size) for p in (args.image_a, args.image_b)]))
    sim = float(np.dot(emb[0].astype(np.float64), emb[1].astype(np.float64)))
    verdict = "same" if sim >= threshold else "different"
    source = "given" if args.threshold is not None else "from the checkpoint"
    print(model.describe())
    print(f"cosine similarity: {sim:.4f}")
    print(f"{verdict} (threshold {threshold:.4f}, {source})")
    return 0
