"""The paper's claims at small scale: DCQ with 1-20% of the classes vs FC and Partial FC.

On synthetic `ms1m`-like (head-heavy) and `mf2`-like (>= 85% of identities with < 10 images) data,
every head trains the CPU network for the same number of steps with the same batch, schedule and
margin, then is evaluated on held-out identities (10-fold verification, flip test; DCQ with the
weight generator) and per long-tail bucket on probes of training identities.

    python benchmarks/claims.py --steps 600 --json claims.json > claims.md

Not part of CI: ~1 minute per run on a 2-core CPU at the defaults (18 runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

RUNS = [
    ("FC", {"head": "fc"}),
    ("Partial FC 0.1", {"head": "pfc", "sample_rate": 0.1}),
    ("DCQ 1%", {"head": "dcq", "queue_size": 0.01}),
    ("DCQ 5%", {"head": "dcq", "queue_size": 0.05}),
    ("DCQ 10%", {"head": "dcq", "queue_size": 0.10}),
    ("DCQ 20%", {"head": "dcq", "queue_size": 0.20}),
    ("DCQ 10% + in-batch negatives", {"head": "dcq", "queue_size": 0.10, "in_batch_negatives": True}),
    ("DCQ 10% + dedup", {"head": "dcq", "queue_size": 0.10, "dedup": True}),
    ("DCQ 10% + 2 references", {"head": "dcq", "queue_size": 0.10, "num_references": 2}),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", default="ms1m,mf2")
    parser.add_argument("--identities", default="ms1m=1500,mf2=4000", help="identities per profile")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--image-size", type=int, default=40)
    parser.add_argument("--cache", default=None, help="dataset folder (default: a temporary folder)")
    parser.add_argument("--only", default="", help="comma-separated run names to keep (default: all)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    from dcq.data import synthesize
    from dcq.demo import DEMO_TRAIN
    from dcq.eval import evaluate_bin, longtail_report
    from dcq.train.checkpoint import build_eval_encoder, load_checkpoint
    from dcq.train.config import build_config
    from dcq.train.loop import train

    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = dict(item.split("=") for item in args.identities.split(","))
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    runs = [r for r in RUNS if not only or r[0] in only]
    cache = Path(args.cache or tempfile.mkdtemp(prefix="dcq-claims-"))
    started = time.time()
    results = []
    for profile in args.profiles.split(","):
        data = cache / f"{profile}-{sizes[profile]}-{args.image_size}px"
        if not (data / "stats.json").is_file():
            synthesize(data, profile=profile, identities=int(sizes[profile]), image_size=args.image_size,
                       seed=0, progress=False, workers=min(2, os.cpu_count() or 1))
        stats = json.loads((data / "stats.json").read_text())
        for name, settings in runs:
            out = Path(tempfile.mkdtemp(prefix="run-", dir=cache))
            values = {**DEMO_TRAIN, "scale": 32.0, "margin": 0.2, "margin_type": "cosface", **settings,
                      "train": str(data), "max_steps": args.steps, "output": str(out), "progress": False,
                      "threads": args.threads}
            t0 = time.time()
            summary = train(build_config(values, "claims"))
            encoder, info = build_eval_encoder(load_checkpoint(summary["final"]))
            verify = evaluate_bin(encoder, data / "val.bin", args.image_size)
            tail = longtail_report(encoder, data, args.image_size)
            results.append({"profile": profile, "run": name, "settings": settings, "verify": verify,
                            "longtail": tail["rows"], "seconds": time.time() - t0,
                            "identities": stats["identities"], "images": stats["images"]})
            print(f"[{profile}] {name}: accuracy {verify['accuracy']:.4f} ({time.time() - t0:.0f}s)",
                  file=sys.stderr)
            shutil.rmtree(out, ignore_errors=True)
            if args.json:  # after every run, so a crash or a stop keeps what was measured
                save_json(args.json, results, time.time() - started, args)
    wall = time.time() - started
    print(markdown(results, args, wall))
    if args.json:
        save_json(args.json, results, wall, args)
    return 0


def save_json(path, results, wall, args) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps({"results": results, "wall_seconds": wall, "machine": machine(),
                               "args": vars(args)}, indent=2))
    os.replace(tmp, path)


def machine() -> str:
    import torch

    return (f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def markdown(results, args, wall) -> str:
    lines = []
    for profile in dict.fromkeys(r["profile"] for r in results):
        rows = [r for r in results if r["profile"] == profile]
        buckets = [b["bucket"] for b in rows[0]["longtail"] if b["bucket"] != "all" and b["probes"]]
        lines += [f"### {profile} ({rows[0]['identities']} identities, {rows[0]['images']} images)", "",
                  "| run | verification accuracy | TAR@FAR=1e-2 | " + " | ".join(
                      f"rank-1 {b}" for b in buckets) + " |",
                  "|---|---|---|" + "---|" * len(buckets)]
        for r in rows:
            by = {b["bucket"]: b for b in r["longtail"]}
            tar = r["verify"]["tar_at_far"].get("1e-2")
            cells = [f"{by[b]['rank1']:.3f}" for b in buckets]
            lines.append(f"| {r['run']} | {r['verify']['accuracy']:.4f} ± {r['verify']['accuracy_std']:.4f} | "
                         f"{'n/a' if tar is None else f'{tar:.3f}'} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"{args.steps} steps per run, batch 128, cpunet {args.image_size}px; machine: {machine()}; "
                 f"wall time {wall / 60:.1f} min.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
