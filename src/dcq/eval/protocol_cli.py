"""The steps of `dcq eval` after the pipeline: the checks of the IJB and MegaFace options, the
protocols themselves, distractor sets, the long-tail / identification report and the tables (split
from `dcq.eval.cli`, which calls them; nothing here imports it)."""

from __future__ import annotations

import sys
from pathlib import Path

from dcq.errors import DcqError
from dcq.tables import fmt_metric, markdown_table

TABLE_FARS = ("1e-4", "1e-3", "1e-2", "1e-1")


def set_names(bins: list[str]) -> list[str]:
    """The JSON key of each ``--bin`` file (its stem); two files of one name are refused."""
    names = [Path(b).stem for b in bins]
    seen = set()
    for b, n in zip(bins, names):
        if n in seen:
            raise DcqError(f"two --bin files are both named {n!r} ({b}); the JSON keys are file stems, "
                           "rename one of them")
        seen.add(n)
    return names


def verification_table(results: dict) -> str:
    head = ["set", "pairs", "accuracy", "std", "threshold"] + [f"TAR@FAR={k}" for k in TABLE_FARS]
    rows = []
    for name, r in results.items():
        cells = [name, str(r["pairs"])] + [fmt_metric(r[k]) for k in ("accuracy", "accuracy_std", "threshold")]
        rows.append(cells + [fmt_metric(r["tar_at_far"].get(k)) for k in TABLE_FARS])
    return markdown_table(head, rows)


def check_protocol_args(args) -> None:
    """Every mistake in the IJB / MegaFace options, before any work."""
    if args.megaface and not args.megaface_distractors:
        raise DcqError("--megaface needs --megaface-distractors FILE.npy (embed the distractor images with "
                       "`dcq embed MODEL DIR --out FILE.npy`)")
    if args.megaface_distractors and not args.megaface:
        raise DcqError("--megaface-distractors needs --megaface DIR (the probe set searched among them)")
    if args.ijb_unit_crops and not args.ijb:
        raise DcqError("--ijb-unit-crops needs --ijb DIR")
    if args.megaface_k < 1:
        raise DcqError(f"--megaface-k {args.megaface_k}: give 1 or more")
    if args.megaface_index not in ("auto", "exact") and args.megaface:
        from dcq.deploy.gallery import load_faiss

        load_faiss(f"--megaface-index {args.megaface_index}")
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
        args.megaface_sets = [read_distractors(p, "--megaface-distractors") for p in args.megaface_distractors]


def read_distractors(path, option: str):
    """A distractor embedding set (`dcq.deploy.embedding_set`: an .npy or a `dcq embed --onnx` folder)."""
    from dcq.deploy.embedding_set import read_embedding_set

    return read_embedding_set(path, option=option)


def check_embedded_by(model, found, option: str) -> None:
    """Refuse a distractor set whose recorded model is not ``model`` (its rows would mean nothing)."""
    mine = getattr(model, "fingerprint", None)
    if found.fingerprint and mine and found.fingerprint != mine:
        raise DcqError(f"{option} {found.path} was embedded by another model (fingerprint {found.fingerprint}, "
                       f"{model.info.get('path')} is {mine}); embed the distractors with the model you evaluate")


def protocols(args, model) -> tuple[dict, dict]:
    """IJB and MegaFace results of `model`: ({"ijb": ..., "megaface": ...}, {name: (fpr, tpr)})."""
    out, curves = {}, {}
    progress = sys.stderr.isatty()
    if args.ijb:
        from dcq.eval.ijb import evaluate_ijb, ijb_table

        ev = evaluate_ijb(model, args.ijb, args.ijb_name, batch_size=args.batch_size, progress=progress,
                          unit_crops=args.ijb_unit_crops)
        m = ev.metrics
        out["ijb"] = {args.ijb_name: m}
        curves[args.ijb_name] = (ev.fpr, ev.tpr)
        print(f"\n{args.ijb_name} (insightface test mode {m['test_mode']}): {m['images']} crops embedded in "
              f"{ev.embed_seconds:.1f} s "
              f"({m['images'] / max(ev.embed_seconds, 1e-9):.0f} crops/s); {m['pairs']} template pairs "
              f"({m['genuine_pairs']} genuine) scored in {ev.score_seconds:.1f} s")
        print(ijb_table(out["ijb"]))
    if args.megaface:
        from dcq.eval.megaface import embed_probe_folder, megaface_identification, megaface_table

        for found in args.megaface_sets:
            check_embedded_by(model, found, "--megaface-distractors")
        emb, labels = embed_probe_folder(model, args.megaface, args.batch_size, progress)
        arrays = [part for found in args.megaface_sets for part in found.parts]
        result = megaface_identification(emb, labels, arrays, args.megaface_sizes, index=args.megaface_index,
                                         index_k=args.megaface_k)
        out["megaface"] = result
        print(f"\nMegaFace identification: {result['probe_images']} probe images of {result['probe_identities']} "
              f"identities, {result['pairs']} (gallery, probe) pairs")
        print(megaface_table(result))
        for record in result["search"]:
            if "recall_at_k" in record:
                print(f"{record['distractors']} distractors: {record['search']} {record['params']}, recall of the "
                      f"exact top {record['k']} = {record['recall_at_k']:.4f} ({record['recall_probes']} probes)")
    return out, curves


def plot_protocols(curves: dict, out: Path) -> None:
    if curves:
        from dcq.eval.plots import plot_roc

        print(f"wrote {plot_roc(curves, out / 'ijb_roc.png', title='IJB 1:1 template verification ROC')}")


def dataset_report(ev, distractors) -> dict:
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
