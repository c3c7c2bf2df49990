"""The parts of `dcq eval` beyond `.bin` verification of a checkpoint: the IJB and MegaFace
protocol options, `.onnx` models, distractor sets and the long-tail report (split from
`dcq.eval.cli` to keep each module short)."""

from __future__ import annotations

import sys
from pathlib import Path

from dcq.atomic import ensure_writable
from dcq.errors import DcqError
from dcq.eval.cli import _set_names, _write_json, verification_table
from dcq.tables import fmt_metric


def _check_protocol_args(args) -> None:
    """Every mistake in the IJB / MegaFace options, before any work."""
    if args.megaface and not args.megaface_distractors:
        raise DcqError("--megaface needs --megaface-distractors FILE.npy (embed the distractor images with "
                       "`dcq embed MODEL DIR --out FILE.npy`)")
    if args.megaface_distractors and not args.megaface:
        raise DcqError("--megaface-distractors needs --megaface DIR (the probe set searched among them)")
    if args.megaface_sizes and not args.megaface:
        raise DcqError("--megaface-sizes needs --megaface DIR")
    if args.megaface_sizes:
        try:
            args.megaface_sizes = [int(v) for v in args.megaface_sizes.split(",") if v.strip()]
        except ValueError:
            raise DcqError(f"--megaface-sizes {args.megaface_sizes!r}: give whole numbers, e.g. 10,100,1000") \
                from None
    if args.ijb and not Path(args.ijb).is_dir():
        raise DcqError(f"--ijb {args.ijb}: folder not found; make a synthetic one with `dcq synth DIR --profile ijb`")
    if args.megaface and not Path(args.megaface).is_dir():
        raise DcqError(f"--megaface {args.megaface}: folder not found; make a synthetic one with "
                       "`dcq synth DIR --profile megaface`")
    clash = {"ijb", "megaface"} & set(Path(b).stem for b in args.bin)
    if clash and (args.ijb or args.megaface):
        raise DcqError(f"--bin {sorted(clash)[0]}.bin would share the JSON key of the {sorted(clash)[0]} results; "
                       "rename the .bin file")
    if args.megaface_distractors:
        args.megaface_arrays, args.megaface_models = [], {}
        for p in args.megaface_distractors:
            args.megaface_arrays += _distractor_arrays(p, args.megaface_models)


def _distractor_arrays(path, models: dict) -> list:
    """Memory-mapped distractor embeddings: one .npy, or every shard of a `dcq embed --onnx` folder in order
    (its model fingerprint goes into ``models[path]``)."""
    path = Path(path)
    if not path.is_dir():
        return [_load_distractors(path, "--megaface-distractors")]
    from dcq.deploy.embed_job import read_manifest

    arrays = []
    manifest = read_manifest(path)
    models[str(path)] = manifest.get("fingerprint")
    for shard in manifest["shards"]:
        arr = _load_distractors(path / shard["file"], "--megaface-distractors")
        if len(arr) != shard["rows"]:
            raise DcqError(f"--megaface-distractors {path / shard['file']}: {len(arr)} rows, the manifest says "
                           f"{shard['rows']}; embed the distractors again")
        arrays.append(arr)
    return arrays


def _protocols(args, model) -> tuple[dict, dict]:
    """IJB and MegaFace results of `model`: ({"ijb": ..., "megaface": ...}, {name: (fpr, tpr)})."""
    out, curves = {}, {}
    progress = sys.stderr.isatty()
    if args.ijb:
        from dcq.eval.ijb import evaluate_ijb, ijb_table

        ev = evaluate_ijb(model, args.ijb, args.ijb_name, batch_size=args.batch_size, progress=progress)
        m = ev.metrics
        out["ijb"] = {args.ijb_name: m}
        curves[args.ijb_name] = (ev.fpr, ev.tpr)
        print(f"\n{args.ijb_name}: {m['images']} crops embedded in {ev.embed_seconds:.1f} s "
              f"({m['images'] / max(ev.embed_seconds, 1e-9):.0f} crops/s); {m['pairs']} template pairs "
              f"({m['genuine_pairs']} genuine) scored in {ev.score_seconds:.1f} s")
        print(ijb_table(out["ijb"]))
    if args.megaface:
        from dcq.eval.megaface import embed_probe_folder, megaface_identification, megaface_table

        if model.kind == "onnx":
            for folder, fingerprint in args.megaface_models.items():
                if fingerprint and fingerprint != model.runner.fingerprint:
                    raise DcqError(f"--megaface-distractors {folder} was embedded by another model (fingerprint "
                                   f"{fingerprint}, {args.checkpoint} is {model.runner.fingerprint}); embed the "
                                   "distractors with the model you evaluate")
        emb, labels = embed_probe_folder(model, args.megaface, args.batch_size, progress)
        result = megaface_identification(emb, labels, args.megaface_arrays, args.megaface_sizes)
        out["megaface"] = result
        print(f"\nMegaFace identification: {result['probe_images']} probe images of {result['probe_identities']} "
              f"identities, {result['pairs']} (gallery, probe) pairs")
        print(megaface_table(result))
    return out, curves


def _plot_protocols(curves: dict, out: Path) -> None:
    if curves:
        from dcq.eval.plots import plot_roc

        print(f"wrote {plot_roc(curves, out / 'ijb_roc.png', title='IJB 1:1 template verification ROC')}")


def _run_eval_model(args) -> int:
    """`dcq eval MODEL.onnx`: .bin verification and the benchmark protocols through onnxruntime."""
    from dcq.eval.embedder import describe, open_model
    from dcq.eval.verification import roc_curve_points, verify_scores

    if args.dataset:
        raise DcqError("--dataset (long-tail report) needs a dcq checkpoint .pt; an .onnx model works with "
                       "--bin, --ijb and --megaface")
    names = _set_names(args.bin)
    for b in args.bin:
        if not Path(b).is_file():
            raise DcqError(f"--bin {b}: file not found")
    if args.batch_size < 1:
        raise DcqError(f"--batch-size must be >= 1, got {args.batch_size}")
    json_path = Path(args.json) if args.json else None
    if json_path is not None:
        if json_path.is_dir():
            raise DcqError(f"--json {json_path} is a directory; give a file name such as metrics.json")
        ensure_writable(json_path)
    if args.plots:
        ensure_writable(Path(args.plots) / "roc.png")
    model = open_model(args.checkpoint, batch_size=args.batch_size, flip=not args.no_flip)
    print(describe(model))
    results, curves = {}, {}
    for name, b in zip(names, args.bin):
        scores, issame = _bin_scores(model, b, args.batch_size)
        results[name] = verify_scores(scores, issame, n_folds=args.folds)
        if issame.any() and not issame.all():
            curves[name] = roc_curve_points(scores, issame)[:2]
    if results:
        print(verification_table(results))
    protocols, ijb_curves = _protocols(args, model)
    if json_path is not None:
        _write_json(json_path, {**results, **protocols})
        print(f"wrote {json_path}")
    if args.plots:
        from dcq.eval.plots import plot_roc

        out = Path(args.plots)
        if curves:
            print(f"wrote {plot_roc(curves, out / 'roc.png')}")
        _plot_protocols(ijb_curves, out)
    return 0


def _bin_scores(model, path, batch_size: int):
    """Cosine scores and issame flags of a .bin's pairs, embedded by `model` one batch at a time."""
    import numpy as np

    from dcq.data.transforms import decode_image
    from dcq.data.verification_bin import read_bin
    from dcq.eval.verification import cosine_scores

    images, issame = read_bin(path)
    if len(issame) == 0:
        raise DcqError(f"{path}: holds no pairs")
    emb = np.concatenate([model.embed(np.stack([decode_image(img, model.image_size, where=f"{path} image {k}")
                                                for k, img in enumerate(images[s:s + batch_size], start=s)]))
                          for s in range(0, len(images), batch_size)])
    return cosine_scores(emb[0::2], emb[1::2]), np.asarray(issame)


def _load_distractors(path, option: str = "--distractors"):
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise DcqError(f"{option} {path}: file not found; make it with `dcq embed CKPT DIR --out {path}`")
    try:
        distractors = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DcqError(f"{option} {path}: not a .npy embedding array ({exc})") from None
    bad = _non_finite_rows(distractors)
    if bad:
        raise DcqError(f"{option} {path}: {bad} of {len(distractors)} embeddings hold NaN or Inf; "
                       "re-create the file with `dcq embed`")
    return distractors


def _dataset_report(ev, distractors) -> dict:
    """Long-tail buckets of the dataset's probe set, plus MegaFace-style identification of the same
    probes against the identity centres and the distractors (one embedding pass for both)."""
    from dcq.eval.identification import identify
    from dcq.eval.longtail import rows_to_markdown

    report, gallery = ev.longtail, ev.gallery
    print(f"\nlong tail ({report['probes']} probes of {report['identities']} training identities; gallery = one "
          "centre per identity):")
    print(rows_to_markdown(report["rows"]))
    out = {"longtail": report}
    if distractors is not None:
        result = identify(gallery.probe_emb, gallery.probe_labels, gallery.centres, gallery.centre_labels,
                          distractor_emb=distractors)
        print(f"\nidentification ({result['probes']} probes, {result['gallery']} identity centres + "
              f"{result['distractors']} distractors): " +
              ", ".join(f"rank-{k} {fmt_metric(v)}" for k, v in result["rank"].items()))
        out["identification"] = result
    return out


def _non_finite_rows(array, chunk: int = 65536) -> int:
    import numpy as np

    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        return 0  # the identification code reports the shape/dtype
    return sum(int((~np.isfinite(array[i:i + chunk])).any(axis=1).sum()) for i in range(0, len(array), chunk))
