"""The claims at convergence: FC, Partial FC and DCQ trained for many epochs, evaluated every epoch.

The short-budget claims tables (`claims.py`, 1,500 steps) see a fraction of an epoch, where FC's
per-identity weights are under-trained by construction. Here every run trains whole epochs on a set
small enough to converge on a CPU (FC updates each class weight hundreds of times), saves a
checkpoint at every epoch end, and every checkpoint is evaluated afterwards on held-out identities:
10-fold verification accuracy, TAR@FAR and, for the mf2-like profile, rank-1 per long-tail bucket
(probes of training identities against per-identity centres).

    python benchmarks/convergence.py --synth ms1m=1000,mf2=3000 --cache .dcq-cache/conv \\
        --epochs 8 --seeds 0,1 --json benchmarks/results/convergence.json --plot-dir docs

Each (profile, run, seed) is one training run; its rows (one per epoch) are appended to the JSON,
which is rewritten atomically after every run, so a stop keeps what was measured. Started again
with the same --json, runs already recorded are skipped (``--redo`` runs them anyway). A run that
fails is recorded with its error and the next one starts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from claims import machine, score_stats

DEFAULT_RUNS = "FC,Partial FC 0.1,DCQ 10%"
FAR_KEYS = {"1e-3": 1e-3, "1e-2": 1e-2}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="", help="profile=DIR,... existing datasets")
    parser.add_argument("--synth", default="", help="profile=IDENTITIES,... synthesise missing sets into --cache")
    parser.add_argument("--cache", default=".dcq-cache/conv", help="dataset folder for --synth")
    parser.add_argument("--val-pairs", type=int, default=12_000,
                        help="verification pairs of synthesised sets (half impostors; TAR@1e-3 needs thousands)")
    parser.add_argument("--runs", default=DEFAULT_RUNS, help=f"comma-separated variant names (default: {DEFAULT_RUNS})")
    parser.add_argument("--variant", action="append", default=[], help="ad-hoc run 'name:key=value;key=value'")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="base key=value for all runs")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--profiles", default="", help="only these profiles of --data/--synth (default: all)")
    parser.add_argument("--image-size", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", required=True)
    parser.add_argument("--plot-dir", default=None, help="write convergence-<profile>.png here")
    parser.add_argument("--redo", action="store_true", help="run again what --json already records")
    parser.add_argument("--markdown", default=None, help="write the tables of --json here")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="no training: merge these result files into --json, then write plots and tables")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args)

    import torch

    from claims import select_runs

    torch.set_num_threads(args.threads)
    runs, base = select_runs(args)
    datasets = prepare(args)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    command = "python benchmarks/convergence.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))

    payload = load_payload(args.json)
    payload.update(command=command, machine=machine())
    payload.setdefault("commands", [])
    if command not in payload["commands"]:
        payload["commands"].append(command)
    for profile, data in datasets.items():
        for seed in seeds:
            for name, settings in runs:
                done = [r for r in payload["rows"] if (r["profile"], r["run"], r["seed"]) == (profile, name, seed)]
                if done and not args.redo:
                    continue
                payload["rows"] = [r for r in payload["rows"] if r not in done]
                payload["failures"] = [f for f in payload["failures"]
                                       if (f["profile"], f["run"], f["seed"]) != (profile, name, seed)]
                t0 = time.time()
                rows, failure = run_one(profile, data, name, {**base, **settings}, seed, args)
                payload["rows"] += rows
                if failure:
                    payload["failures"].append(failure)
                last = rows[-1] if rows else None
                print(f"[{profile} seed {seed}] {name}: "
                      + (f"epoch {last['epoch']} accuracy {last['accuracy']:.4f}" if last else "FAILED "
                         + failure["error"]) + f" ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
                write_payload(args.json, payload)
                write_reports(args, payload)
    return 0


def merge(args) -> int:
    """Rows of several result files (one per profile or per batch of runs) in one file."""
    payload = {"rows": [], "failures": [], "commands": []}
    for path in args.merge:
        part = load_payload(path)
        payload["rows"] += part["rows"]
        payload["failures"] += part["failures"]
        payload["commands"] += part.get("commands") or [part["command"]]
        payload.setdefault("machine", part.get("machine"))
    write_payload(args.json, payload)
    write_reports(args, payload)
    return 0


def write_reports(args, payload) -> None:
    from dcq.atomic import atomic_write

    if args.plot_dir:
        plot(payload["rows"], args.plot_dir)
    if args.markdown:
        text = markdown(payload["rows"])
        atomic_write(args.markdown, lambda f: f.write(text.encode()))


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _cell(values, digits=4) -> str:
    """'mean (a / b)' over seeds."""
    shown = [f"{v:.{digits}f}" if v is not None else "n/a" for v in values]
    mean = _mean(values)
    return "n/a" if mean is None else (f"{mean:.{digits}f}" + (f" ({' / '.join(shown)})" if len(values) > 1 else ""))


def markdown(rows: list[dict]) -> str:
    """Per profile: the last epoch of every run (mean over seeds, each seed in brackets), and
    accuracy against epochs (mean over seeds)."""
    lines = []
    for profile in dict.fromkeys(r["profile"] for r in rows):
        mine = [r for r in rows if r["profile"] == profile]
        runs = list(dict.fromkeys(r["run"] for r in mine))
        buckets = ["1-2", "3-9"] if any(r.get("rank1_buckets") for r in mine) else []
        first = mine[0]
        lines += [f"### {profile}-like: {first['identities']:,} identities, {first['images']:,} images, "
                  f"{first['val_pairs']:,} verification pairs", "",
                  "At each run's last epoch (mean over seeds; each seed in brackets):", "",
                  "| run | epochs | seeds | accuracy | TAR@FAR=1e-3 | TAR@FAR=1e-2 | "
                  + "".join(f"rank-1 {b} | " for b in buckets) + "train s |",
                  "|---|---|---|---|---|---|" + "---|" * len(buckets) + "---|"]
        for run in runs:
            last_epoch = max(r["epoch"] for r in mine if r["run"] == run)
            final = sorted((r for r in mine if r["run"] == run and r["epoch"] == last_epoch), key=lambda r: r["seed"])
            cells = "".join(f"{_cell([r['rank1_buckets'].get(b) for r in final], 3)} | " for b in buckets)
            lines.append(f"| {run} | {last_epoch} | {','.join(str(r['seed']) for r in final)} | "
                         f"{_cell([r['accuracy'] for r in final])} | "
                         f"{_cell([r['tar_at_far']['1e-3'] for r in final], 3)} | "
                         f"{_cell([r['tar_at_far']['1e-2'] for r in final], 3)} | {cells}"
                         f"{_mean([r['train_seconds'] for r in final]):.0f} |")
        epochs = sorted({r["epoch"] for r in mine})
        lines += ["", "Accuracy against epochs (mean over seeds):", "",
                  "| run | " + " | ".join(str(e) for e in epochs) + " |", "|---|" + "---|" * len(epochs)]
        for run in runs:
            by_epoch = {e: _mean([r["accuracy"] for r in mine if r["run"] == run and r["epoch"] == e]) for e in epochs}
            lines.append(f"| {run} | " + " | ".join("" if by_epoch[e] is None else f"{by_epoch[e]:.4f}"
                                                     for e in epochs) + " |")
        lines.append("")
    return "\n".join(lines)


def prepare(args) -> dict[str, Path]:
    from dcq.data import synthesize

    datasets = {}
    for item in filter(None, args.data.split(",")):
        profile, folder = item.split("=", 1)
        datasets[profile] = Path(folder)
    for item in filter(None, args.synth.split(",")):
        profile, identities = item.split("=", 1)
        folder = Path(args.cache) / f"{profile}-{identities}-{args.image_size}px-{args.val_pairs}pairs"
        if not (folder / "stats.json").is_file():
            synthesize(folder, profile=profile, identities=int(identities), image_size=args.image_size,
                       val_pairs=args.val_pairs, seed=0, progress=False, workers=min(2, os.cpu_count() or 1))
        datasets[profile] = folder
    if args.profiles:
        wanted = [p.strip() for p in args.profiles.split(",")]
        datasets = {p: d for p, d in datasets.items() if p in wanted}
    if not datasets:
        raise SystemExit("give --data profile=DIR or --synth profile=IDENTITIES")
    return datasets


def load_payload(path) -> dict:
    if Path(path).is_file():
        payload = json.loads(Path(path).read_text())
        payload.setdefault("failures", [])
        return payload
    return {"rows": [], "failures": []}


def write_payload(path, payload) -> None:
    from dcq.atomic import atomic_write

    atomic_write(path, lambda f: f.write(json.dumps(payload, indent=1).encode()))


def run_one(profile: str, data: Path, name: str, settings: dict, seed: int, args) -> tuple[list[dict], dict | None]:
    """Train `epochs` whole epochs with a checkpoint at every epoch end, then evaluate each one."""
    from dcq.demo import DEMO_TRAIN
    from dcq.eval.pipeline import evaluate_checkpoint
    from dcq.train.config import build_config
    from dcq.train.loop import train

    stats = json.loads((data / "stats.json").read_text())
    out = Path(tempfile.mkdtemp(prefix="dcq-conv-"))
    rows: list[dict] = []
    try:
        steps_per_epoch = stats["images"] // {**DEMO_TRAIN, **settings}["batch_size"]  # one process
        values = {**DEMO_TRAIN, **settings, "train_data": str(data), "epochs": float(args.epochs), "max_steps": 0,
                  "checkpoint_every": steps_per_epoch, "keep_last": args.epochs + 1, "output": str(out),
                  "progress": False, "threads": args.threads, "seed": seed, "eval_bins": [], "eval_every": 0}
        t0 = time.time()
        summary = train(build_config(values, source=f"run {name!r}"))
        train_seconds = time.time() - t0
        longtail = profile == "mf2"
        for ckpt in sorted(out.glob("step_*.pt")):
            step = int(ckpt.stem.split("_")[1])
            epoch = step / steps_per_epoch
            if not math.isclose(epoch, round(epoch)):
                continue  # only whole epochs (the final checkpoint is one)
            t1 = time.time()
            ev = evaluate_checkpoint(ckpt, [data / "val.bin"], data if longtail else None)
            verify = ev.verification["val"]
            row = {"profile": profile, "run": name, "seed": seed, "epoch": int(round(epoch)), "steps": step,
                   "accuracy": verify["accuracy"], "accuracy_std": verify["accuracy_std"],
                   "tar_at_far": {key: verify["tar_at_far"].get(key) for key in FAR_KEYS},
                   "score_stats": score_stats(*ev.scores["val"]), "encoder": ev.info["which"],
                   "identities": stats["identities"], "images": stats["images"], "val_pairs": verify["pairs"],
                   "settings": settings, "train_seconds": train_seconds, "eval_seconds": time.time() - t1}
            if longtail:  # DEFAULT_BUCKETS: 1-2, 3-9, 10-49, 50+ images per identity
                row["rank1_buckets"] = {r["bucket"]: r["rank1"] for r in ev.longtail["rows"]}
            rows.append(row)
        del summary
        return rows, None
    except Exception as exc:  # a failed run is recorded, the next one starts
        return rows, {"profile": profile, "run": name, "seed": seed, "error": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc()}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def plot(rows: list[dict], folder) -> None:
    """One figure per profile: accuracy against epochs, the mean over seeds bold, each seed faint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from dcq.atomic import atomic_write

    for profile in dict.fromkeys(r["profile"] for r in rows):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        mine = [r for r in rows if r["profile"] == profile]
        for i, run in enumerate(dict.fromkeys(r["run"] for r in mine)):
            colour = f"C{i}"
            by_seed: dict[int, dict[int, float]] = {}
            for r in mine:
                if r["run"] == run:
                    by_seed.setdefault(r["seed"], {})[r["epoch"]] = r["accuracy"]
            for curve in by_seed.values():
                ax.plot(list(curve), list(curve.values()), color=colour, alpha=0.3, lw=1)
            epochs = sorted(set.intersection(*(set(c) for c in by_seed.values())))
            mean = [np.mean([c[e] for c in by_seed.values()]) for e in epochs]
            ax.plot(epochs, mean, color=colour, marker="o", ms=3, lw=2,
                    label=f"{run} (mean of {len(by_seed)} seed{'s' * (len(by_seed) > 1)})")
        first = mine[0]
        ax.set_title(f"{profile}-like, {first['identities']:,} identities, {first['images']:,} images")
        ax.set_xlabel("epoch")
        ax.set_ylabel("held-out verification accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        atomic_write(Path(folder) / f"convergence-{profile}.png", lambda f: fig.savefig(f, format="png", dpi=110))
        plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
