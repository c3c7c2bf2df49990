"""The paper's claims at small scale, and the experiments behind the DCQ recipe.

Every run trains the CPU network for the same number of steps with the same batch, schedule and
data, then is evaluated on held-out identities (10-fold verification, flip test; DCQ with the weight
generator) and, where the training set is small enough to embed, per long-tail bucket on probes of
training identities. Verification accuracy is also measured every `--eval-every` steps for the
accuracy-against-steps plot.

    python benchmarks/claims.py --data ms1m=DIR,mf2=DIR --steps 1500 \\
        --json claims.json --markdown claims.md --plot claims.png

A run is a named variant (see VARIANTS, or `--variant "name:key=value;key=value"` for an ad-hoc one)
applied on top of the base recipe (`--set key=value` changes the base for every run). JSON,
markdown and plot are rewritten after every run, so a crash or a stop keeps what was measured; a
run that fails is recorded with its error and the next one starts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

# Shared by every run, on top of the demo's training settings (dcq.demo.DEMO_TRAIN: cpunet 40 px, 128-d,
# batch 128, SGD lr 0.1 cosine): the demo's CosFace scale and margin.
BASE = {"scale": 32.0, "margin": 0.2, "margin_type": "cosface"}

VARIANTS: dict[str, dict] = {
    "FC": {"head": "fc"},
    "Partial FC 0.1": {"head": "pfc", "sample_rate": 0.1},
    "DCQ 10%": {"head": "dcq", "queue_fraction": 0.1},
    "DCQ 10% queue only": {"head": "dcq", "queue_fraction": 0.1, "in_batch_negatives": False},
    "DCQ 1%": {"head": "dcq", "queue_fraction": 0.01},
    "DCQ 1.25%": {"head": "dcq", "queue_fraction": 0.0125},
    "DCQ 2.5%": {"head": "dcq", "queue_fraction": 0.025},
    "DCQ 5%": {"head": "dcq", "queue_fraction": 0.05},
    "DCQ 5% queue only": {"head": "dcq", "queue_fraction": 0.05, "in_batch_negatives": False},
    "DCQ 20%": {"head": "dcq", "queue_fraction": 0.2},
    # the generator momentum that was dcq train's default until the paper-ratio study (rows before it used it)
    "DCQ 10% m0.9": {"head": "dcq", "queue_fraction": 0.1, "generator_momentum": 0.9},
    "DCQ 10% queue only m0.9": {"head": "dcq", "queue_fraction": 0.1, "in_batch_negatives": False,
                                "generator_momentum": 0.9},
}
DEFAULT_RUNS = "FC,Partial FC 0.1,DCQ 10%"
LONGTAIL_MAX_IMAGES = 200_000  # embedding a larger training set for the gallery costs more than the run


def parse_variant(text: str) -> tuple[str, dict]:
    """'name:key=value;key=value' -> (name, {key: value}); values are checked like --set."""
    from dcq.train.config import parse_overrides

    if ":" not in text:
        raise SystemExit(f"--variant {text!r}: expected 'name:key=value;key=value'")
    name, body = text.split(":", 1)
    return name.strip(), parse_overrides([p for p in body.split(";") if p.strip()])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="", help="profile=DIR,... existing datasets (see --synth)")
    parser.add_argument("--synth", default="", help="profile=IDENTITIES,... synthesise missing datasets "
                                                    "into --cache (e.g. ms1m=10000,mf2=10000)")
    parser.add_argument("--cache", default=None, help="dataset folder for --synth (default: a temporary one)")
    parser.add_argument("--runs", default=DEFAULT_RUNS, help=f"comma-separated variant names (default: {DEFAULT_RUNS})")
    parser.add_argument("--variant", action="append", default=[], help="ad-hoc run 'name:key=value;key=value'")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="base key=value for all runs")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; every run is repeated per seed")
    parser.add_argument("--eval-every", type=int, default=250, help="steps between verification points (0: end)")
    parser.add_argument("--image-size", type=int, default=40)
    parser.add_argument("--longtail", choices=("auto", "on", "off"), default="auto",
                        help=f"long-tail buckets (auto: on when the set has <= {LONGTAIL_MAX_IMAGES} images)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--keep", default=None, metavar="DIR",
                        help="copy every run's final checkpoint to DIR/<profile>-<run>-seed<N>.pt")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    runs, base = select_runs(args)
    datasets = prepare_datasets(args)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    command = "python benchmarks/claims.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    started = time.time()
    results: list[dict] = []
    for profile, data in datasets.items():
        for seed in seeds:
            for name, settings in runs:
                result = run_one(profile, data, name, {**base, **settings}, seed, args)
                results.append(result)
                acc = result.get("verify", {}).get("accuracy")
                print(f"[{profile} seed {seed}] {name}: "
                      f"{'FAILED ' + result['error'] if acc is None else f'accuracy {acc:.4f}'} "
                      f"({result['seconds']:.0f}s)", file=sys.stderr, flush=True)
                write_outputs(args, results, time.time() - started, command)
    print(markdown(results, args, time.time() - started, command))
    return 0


def select_runs(args) -> tuple[list[tuple[str, dict]], dict]:
    """(runs, base settings) from --runs, --variant and --set, every run's settings checked now:
    a typo fails before the first run, not after hours of earlier ones."""
    from dcq.train.config import parse_overrides

    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--runs: unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)} (or use --variant)")
    runs = [(name, VARIANTS[name]) for name in names] + [parse_variant(v) for v in args.variant]
    base = {**BASE, **parse_overrides(args.overrides)}
    for name, settings in runs:
        check_settings(name, {**base, **settings})
    return runs, base


def check_settings(name: str, settings: dict) -> None:
    """Exit with one line when run `name`'s settings are not a valid training config."""
    from dcq.demo import DEMO_TRAIN
    from dcq.errors import DcqError
    from dcq.train.config import build_config

    try:
        build_config({**DEMO_TRAIN, **settings}, source=f"run {name!r}")
    except DcqError as exc:
        raise SystemExit(str(exc)) from None


def prepare_datasets(args) -> dict[str, Path]:
    datasets = {}
    for item in filter(None, args.data.split(",")):
        profile, folder = item.split("=", 1)
        datasets[profile] = Path(folder)
    if args.synth:
        from dcq.data import synthesize

        cache = Path(args.cache or tempfile.mkdtemp(prefix="dcq-claims-"))
        for item in args.synth.split(","):
            profile, identities = item.split("=", 1)
            folder = cache / f"{profile}-{identities}-{args.image_size}px"
            if not (folder / "stats.json").is_file():
                synthesize(folder, profile=profile, identities=int(identities), image_size=args.image_size,
                           seed=0, progress=False, workers=min(2, os.cpu_count() or 1))
            datasets[profile] = folder
    if not datasets:
        raise SystemExit("give --data profile=DIR or --synth profile=IDENTITIES")
    return datasets


def run_one(profile: str, data: Path, name: str, settings: dict, seed: int, args) -> dict:
    from dcq.atomic import atomic_write
    from dcq.demo import DEMO_TRAIN
    from dcq.eval import evaluate_bin
    from dcq.eval.pipeline import load_encoder
    from dcq.experiment import train_and_evaluate

    stats = json.loads((data / "stats.json").read_text())
    out = Path(tempfile.mkdtemp(prefix="dcq-run-"))
    record = {"profile": profile, "run": name, "settings": settings, "seed": seed, "steps": args.steps,
              "identities": stats["identities"], "images": stats["images"]}
    t0 = time.time()
    try:
        longtail = args.longtail == "on" or (args.longtail == "auto" and stats["images"] <= LONGTAIL_MAX_IMAGES)
        values = {**DEMO_TRAIN, **settings, "train_data": str(data), "max_steps": args.steps, "output": str(out),
                  "progress": False, "threads": args.threads, "seed": seed,
                  "eval_bins": [str(data / "val.bin")] if args.eval_every else [],
                  "eval_every": args.eval_every}
        summary, evaluation = train_and_evaluate(values, source="claims", bins=[data / "val.bin"],
                                                 dataset=data if longtail else None)
        record["verify"] = evaluation.verification["val"]
        record["score_stats"] = score_stats(*evaluation.scores["val"])
        record["curve"] = [(h["step"], h["val"]) for h in summary.get("eval_history", []) if "val" in h]
        record["encoder"] = evaluation.info["which"]
        record["train_seconds"] = summary["train_seconds"]
        if evaluation.info["which"] != "feature_extractor":  # DCQ: the trained encoder too, to compare
            extractor, _, _ = load_encoder(summary["final"], prefer="feature_extractor")
            record["verify_feature_extractor"] = evaluate_bin(extractor, data / "val.bin", args.image_size)
        if evaluation.longtail is not None:
            record["longtail"] = evaluation.longtail["rows"]
        if args.keep:
            kept = Path(args.keep) / f"{profile}-{name}-seed{seed}.pt".replace(" ", "_").replace("%", "pct")
            kept.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(kept, lambda f: f.write(Path(summary["final"]).read_bytes()))
            record["checkpoint"] = str(kept)
    except Exception as exc:  # keep going: a failed run is a row too
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    record["seconds"] = time.time() - t0
    return record


def score_stats(scores, issame) -> dict:
    """Where verification errors come from: the genuine and impostor cosine distributions, the
    impostor tail that sets the threshold at FAR 1e-2 / 1e-3, and the separation d' between them."""
    import numpy as np

    scores = np.asarray(scores, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    genuine, impostor = scores[issame], scores[~issame]
    d_prime = (genuine.mean() - impostor.mean()) / np.sqrt((genuine.var() + impostor.var()) / 2)
    return {"genuine_mean": float(genuine.mean()), "genuine_std": float(genuine.std()),
            "impostor_mean": float(impostor.mean()), "impostor_std": float(impostor.std()),
            "impostor_q99": float(np.quantile(impostor, 0.99)),
            "impostor_q999": float(np.quantile(impostor, 0.999)), "d_prime": float(d_prime)}


def machine() -> str:
    import torch

    return (f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def write_outputs(args, results, wall, command) -> None:
    from dcq.atomic import atomic_write

    if args.json:
        payload = {"command": command, "results": results, "wall_seconds": wall, "machine": machine()}
        atomic_write(args.json, lambda f: f.write(json.dumps(payload, indent=2).encode()))
    if args.markdown:
        text = markdown(results, args, wall, command)
        atomic_write(args.markdown, lambda f: f.write(text.encode()))
    if args.plot:
        plot_curves(results, args.plot)


def _fmt(value, digits=3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(results, args, wall, command) -> str:
    lines = [f"`{command}`", ""]
    for profile in dict.fromkeys(r["profile"] for r in results):
        rows = [r for r in results if r["profile"] == profile]
        tails = next((r["longtail"] for r in rows if r.get("longtail")), [])
        buckets = [b["bucket"] for b in tails if b["bucket"] != "all" and b["probes"]]
        lines += [f"### {profile} ({rows[0]['identities']:,} identities, {rows[0]['images']:,} images)", "",
                  "| run | seed | verification accuracy | TAR@FAR=1e-3 | TAR@FAR=1e-2 | genuine cos | "
                  "impostor cos 99th pct | d' | " + "".join(f"rank-1 {b} | " for b in buckets),
                  "|---|---|---|---|---|---|---|---|" + "---|" * len(buckets)]
        for r in rows:
            if "verify" not in r:
                lines.append(f"| {r['run']} | {r['seed']} | failed: {r.get('error', '?')} | | | | | |"
                             + " |" * len(buckets))
                continue
            v = r["verify"]
            by = {b["bucket"]: b for b in r.get("longtail") or []}
            cells = "".join(f"{_fmt(by[b]['rank1']) if b in by else 'n/a'} | " for b in buckets)
            st = r.get("score_stats", {})
            lines.append(f"| {r['run']} | {r['seed']} | {v['accuracy']:.4f} ± {v['accuracy_std']:.4f} | "
                         f"{_fmt(v['tar_at_far'].get('1e-3'))} | {_fmt(v['tar_at_far'].get('1e-2'))} | "
                         f"{_fmt(st.get('genuine_mean'))} | {_fmt(st.get('impostor_q99'))} | "
                         f"{_fmt(st.get('d_prime'), 2)} | {cells}")
        lines.append("")
    lines.append(f"{args.steps} steps per run, cpunet {args.image_size}px (other settings in the JSON); {machine()}; "
                 f"wall time {wall / 60:.1f} min.")
    return "\n".join(lines)


def plot_curves(results, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dcq.atomic import atomic_write

    profiles = list(dict.fromkeys(r["profile"] for r in results))
    fig, axes = plt.subplots(1, len(profiles), figsize=(6 * len(profiles), 4.5), squeeze=False)
    for ax, profile in zip(axes[0], profiles):
        for r in results:
            if r["profile"] == profile and r.get("curve"):
                steps, acc = zip(*r["curve"])
                ax.plot(steps, acc, marker="o", ms=3, label=f"{r['run']} (seed {r['seed']})")
        ax.set_title(f"{profile}: held-out verification accuracy")
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
