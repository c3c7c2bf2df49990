"""The claims at the paper's queue ratio: FC, Partial FC and DCQ to convergence, judged at FAR 1e-4..1e-6.

The earlier convergence study (`convergence.py`) trained sets so small that DCQ's 10% queue held
0.8-2.3 global batches; the paper's recipe runs with ~16. Here the sets are sized so the 10% queue
spans >= 8 batches (ms1m-like 5,120 identities, mf2-like 10,240, batch 64: 8 and 16 batches), and
every epoch end is evaluated on:

- accuracy: 10-fold verification of the set's ``val.bin`` (held-out identities, 12,000 pairs);
- TAR at FAR 1e-4, 1e-5, 1e-6: every pair of a held-out set of the same generator (``dcq synth
  --profile megaface``: identities numbered from 20,000,000, never trained on; 2,000 identities x
  10 images = ~2e8 impostor and 90,000 genuine pairs), scored in blocks by
  `dcq.eval.streamed_tar_at_far`;
- on the mf2-like set, rank-1 of probes of training identities per bucket of training images.

    python benchmarks/convergence_paper.py --synth ms1m=5120,mf2=10240 --cache .dcq-cache/paper \\
        --json benchmarks/results/convergence-paper.json --plot-dir docs

Runs go in the order of ``--plan`` (default: seed 0 of FC and DCQ on each profile, then Partial FC,
then seed 1 of FC and DCQ); ``--variant`` adds named one-variable runs for it. Two processes may
share the cache (different runs) but not a JSON: give the second its own ``--json`` and fold it in
afterwards with ``--report-only --merge``. Each run trains in its own folder under ``--cache``/runs with a
checkpoint at every epoch end; after each epoch its row is appended to ``--json`` (rewritten
atomically). Started again with the same arguments, finished runs are skipped, a stopped run
resumes from its last epoch checkpoint (`dcq train --resume`'s path), and epochs checkpointed but
not yet evaluated are evaluated first: a stop loses at most one epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from claims import BASE, VARIANTS, machine, parse_variant
from convergence import load_payload, write_payload
from paper_report import markdown, plot

FULL_PLAN = ("ms1m:FC:0,ms1m:DCQ 10%:0,mf2:FC:0,mf2:DCQ 10%:0,ms1m:Partial FC 0.1:0,mf2:Partial FC 0.1:0,"
             "ms1m:FC:1,ms1m:DCQ 10%:1,mf2:FC:1,mf2:DCQ 10%:1")
PAPER_TRAIN = {"image_size": 32, "batch_size": 64}  # on top of dcq.demo.DEMO_TRAIN and claims.BASE


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synth", default="ms1m=5120,mf2=10240", help="profile=IDENTITIES,... (made if missing)")
    parser.add_argument("--cache", default=".dcq-cache/paper", help="datasets, held-out set and run folders")
    parser.add_argument("--heldout", default="2000x10", help="held-out set: IDENTITIESxIMAGES")
    parser.add_argument("--val-pairs", type=int, default=12_000)
    parser.add_argument("--plan", default=FULL_PLAN, help="profile:run:seed,... in the order to run")
    parser.add_argument("--variant", action="append", default=[],
                        help="ad-hoc run 'name:key=value;key=value' that --plan can name (one-variable studies)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=PAPER_TRAIN["image_size"])
    parser.add_argument("--batch", type=int, default=PAPER_TRAIN["batch_size"])
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="key=value for every run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", required=True)
    parser.add_argument("--plot-dir", default=None, help="write convergence-paper-<profile>.png here")
    parser.add_argument("--markdown", default=None, help="write the tables of --json here")
    parser.add_argument("--report-only", action="store_true", help="no training: plots and tables of --json")
    parser.add_argument("--merge", action="append", default=[],
                        help="with --report-only: add the rows of another study's JSON (a plan run in a second "
                             "process with its own --json) to --json first; rows already there are kept")
    args = parser.parse_args(argv)
    if args.merge and not args.report_only:
        raise SystemExit("--merge: use it with --report-only (a running study rewrites --json from memory)")
    if args.report_only:
        payload = load_payload(args.json)
        for other in args.merge:
            merge_payload(payload, load_payload(other))
        if args.merge:
            write_payload(args.json, payload)
        write_reports(args, payload)
        return 0

    import torch

    from dcq.train.config import parse_overrides
    from dcq.train.loop import TrainingStopped

    torch.set_num_threads(args.threads)
    variants = {**VARIANTS, **dict(parse_variant(v) for v in args.variant)}
    plan = parse_plan(args.plan, variants)
    base = {**BASE, **parse_overrides(args.overrides)}
    datasets, heldout_dir = prepare(args)
    heldout = load_heldout(heldout_dir)
    command = "python benchmarks/convergence_paper.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    payload = load_payload(args.json)
    payload.update(machine=machine())
    payload.setdefault("commands", [])
    if command not in payload["commands"]:
        payload["commands"].append(command)
    for profile, name, seed in plan:
        if profile not in datasets:
            raise SystemExit(f"--plan: profile {profile!r} is not in --synth")
        t0 = time.time()
        try:
            run_one(profile, datasets[profile], name, {**base, **variants[name]}, seed, heldout, payload, args)
        except TrainingStopped:  # SIGTERM: the run saved its step; stop the study, a rerun resumes it
            log(f"[{profile} {name} seed {seed}] stopped by SIGTERM; rerun the same command to resume")
            return 143
        except Exception as exc:  # a failed run is recorded, the next one starts
            payload["failures"].append({"profile": profile, "run": name, "seed": seed,
                                        "error": f"{type(exc).__name__}: {exc}",
                                        "traceback": traceback.format_exc()})
            write_payload(args.json, payload)
            log(f"[{profile} {name} seed {seed}] FAILED {type(exc).__name__}: {exc}")
        log(f"[{profile} {name} seed {seed}] done ({time.time() - t0:.0f}s)")
    write_reports(args, payload)
    return 0


def merge_payload(payload: dict, other: dict) -> None:
    """Add `other`'s rows whose (profile, run, seed, epoch) `payload` lacks, its failures and commands."""
    have = {(r["profile"], r["run"], r["seed"], r["epoch"]) for r in payload["rows"]}
    payload["rows"] += [r for r in other["rows"] if (r["profile"], r["run"], r["seed"], r["epoch"]) not in have]
    payload["failures"] += [f for f in other.get("failures", []) if f not in payload["failures"]]
    payload.setdefault("commands", [])
    payload["commands"] += [c for c in other.get("commands", []) if c not in payload["commands"]]


def log(text: str) -> None:
    print(time.strftime("%H:%M:%S ") + text, file=sys.stderr, flush=True)


def parse_plan(text: str, variants: dict = VARIANTS) -> list[tuple[str, str, int]]:
    plan = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        parts = item.split(":")
        if len(parts) != 3 or parts[1] not in variants or not parts[2].isdigit():
            raise SystemExit(f"--plan {item!r}: expected profile:run:seed with run one of {', '.join(variants)}")
        plan.append((parts[0], parts[1], int(parts[2])))
    return plan


def prepare(args) -> tuple[dict[str, Path], Path]:
    """Synthesise what is missing: the training sets and the held-out set."""
    import subprocess

    from dcq.data import synthesize

    cache = Path(args.cache)
    datasets = {}
    for item in filter(None, args.synth.split(",")):
        profile, identities = item.split("=", 1)
        folder = cache / f"{profile}-{identities}-{args.image_size}px"
        if not (folder / "stats.json").is_file():
            synthesize(folder, profile=profile, identities=int(identities), image_size=args.image_size,
                       val_pairs=args.val_pairs, seed=0, progress=False, workers=min(2, os.cpu_count() or 1))
        datasets[profile] = folder
    ids, per = (int(v) for v in args.heldout.split("x"))
    heldout = cache / f"heldout-{ids}x{per}-{args.image_size}px"
    if not (heldout / "stats.json").is_file():
        subprocess.run([sys.executable, "-m", "dcq", "synth", str(heldout), "--profile", "megaface",
                        "--identities", str(ids), "--images-per-identity", str(per), "--distractors", "1",
                        "--image-size", str(args.image_size), "--seed", "0", "--quiet"], check=True)
    return datasets, heldout


def load_heldout(folder: Path):
    """(uint8 N x H x W x 3 images, labels) of ``probes/<identity>/*.jpg``, decoded once."""
    import numpy as np

    from dcq.data import decode_image

    images, labels = [], []
    for label, identity in enumerate(sorted(p for p in (folder / "probes").iterdir() if p.is_dir())):
        for path in sorted(identity.glob("*.jpg")):
            images.append(decode_image(path.read_bytes(), where=str(path)))
            labels.append(label)
    return np.stack(images), np.asarray(labels)


def run_folder(args, profile: str, name: str, seed: int) -> Path:
    slug = name.replace(" ", "_").replace("%", "pct")
    return Path(args.cache) / "runs" / f"{profile}-{slug}-seed{seed}"


def run_one(profile, data, name, settings, seed, heldout, payload, args) -> None:
    """Train (or resume) one run; every epoch-end checkpoint without a row gets evaluated."""
    from dcq.demo import DEMO_TRAIN
    from dcq.heads.registry import resolve_queue_size
    from dcq.train.config import build_config
    from dcq.train.loop import Trainer

    stats = json.loads((data / "stats.json").read_text())
    out = run_folder(args, profile, name, seed)
    spe = stats["images"] // args.batch  # steps per epoch, one process
    cfg = build_config({**DEMO_TRAIN, **settings, "image_size": args.image_size, "batch_size": args.batch,
                        "train_data": str(data), "epochs": float(args.epochs), "max_steps": 0,
                        "checkpoint_every": spe, "keep_last": args.epochs + 1, "output": str(out),
                        "progress": False, "threads": args.threads, "seed": seed, "eval_bins": [],
                        "eval_every": 0}, source=f"run {name!r}")
    queue_batches = (resolve_queue_size(cfg, stats["identities"]) / args.batch) if cfg.head == "dcq" else None
    context = {"profile": profile, "run": name, "seed": seed, "queue_batches": queue_batches, "stats": stats,
               "settings": settings, "out": out, "spe": spe, "started": time.time()}

    def pending():
        done = {r["epoch"] for r in payload["rows"] if (r["profile"], r["run"], r["seed"]) == (profile, name, seed)}
        for ckpt in sorted(out.glob("step_*.pt")):
            step = int(ckpt.stem.split("_")[1])
            if step % spe == 0 and step // spe not in done:
                payload["rows"].append(evaluate_epoch(ckpt, step // spe, step, data, heldout, context))
                write_payload(args.json, payload)
                write_reports(args, payload)

    pending()
    if len({r["epoch"] for r in payload["rows"]
            if (r["profile"], r["run"], r["seed"]) == (profile, name, seed)}) >= args.epochs:
        log(f"[{profile} {name} seed {seed}] all {args.epochs} epochs recorded; skipped")
        return

    class EpochTrainer(Trainer):
        def evaluate(self):  # called at every epoch end (eval_every=0), after the epoch's checkpoint
            result = super().evaluate()
            context["head"] = self.model.head.extra_repr()
            with kept_random_state():  # building the evaluation encoder draws from the global RNGs
                pending()
            return result

    log(f"[{profile} {name} seed {seed}] training in {out} ({spe} steps/epoch, queue "
        f"{'-' if queue_batches is None else f'{queue_batches:g} batches'})")
    trainer = EpochTrainer(cfg, resume="auto")
    try:
        trainer.run()
    finally:
        trainer.close()
    pending()


@contextmanager
def kept_random_state():
    """The global RNG states of torch, numpy and random, restored on exit: training after an
    evaluation draws what it would have drawn without one (as a resumed run does)."""
    import random

    import numpy as np
    import torch

    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


def evaluate_epoch(ckpt: Path, epoch: int, step: int, data: Path, heldout, context: dict) -> dict:
    from dcq.eval import embed_images, evaluate_checkpoint, streamed_tar_at_far

    t0 = time.time()
    longtail = context["profile"] == "mf2"
    ev = evaluate_checkpoint(ckpt, [data / "val.bin"], data if longtail else None)
    verify = ev.verification["val"]
    images, labels = heldout
    low = streamed_tar_at_far(embed_images(ev.encoder, images, batch_size=256), labels)
    stats = context["stats"]
    row = {"profile": context["profile"], "run": context["run"], "seed": context["seed"], "epoch": epoch,
           "steps": step, "queue_batches": context["queue_batches"], "accuracy": verify["accuracy"],
           "tar_at_far": low["tar_at_far"], "impostor_pairs": low["impostor_pairs"],
           "genuine_pairs": low["genuine_pairs"], "impostors_above": low["impostors_above"],
           "heldout_genuine_mean": low["genuine_mean"], "heldout_impostor_mean": low["impostor_mean"],
           "accuracy_std": verify["accuracy_std"], "val_pairs": verify["pairs"],
           "val_tar_at_far": {k: verify["tar_at_far"].get(k) for k in ("1e-3", "1e-2")},
           "encoder": ev.info["which"], "head": context.get("head"), "identities": stats["identities"],
           "images": stats["images"], "settings": context["settings"],
           "wall_seconds": time.time() - context["started"], "eval_seconds": None}
    if longtail:  # DEFAULT_BUCKETS: 1-2, 3-9, 10-49, 50+ images per identity
        row["rank1_buckets"] = {r["bucket"]: r["rank1"] for r in ev.longtail["rows"]}
    row["eval_seconds"] = time.time() - t0
    log(f"[{row['profile']} {row['run']} seed {row['seed']}] epoch {epoch}: accuracy {row['accuracy']:.4f}, "
        f"TAR@FAR " + ", ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'}" for k, v in row["tar_at_far"].items())
        + f" ({row['eval_seconds']:.0f}s eval)")
    return row


def write_reports(args, payload) -> None:
    from dcq.atomic import atomic_write

    if not payload["rows"]:
        return
    if args.plot_dir:
        plot(payload["rows"], args.plot_dir)
    if args.markdown:
        text = markdown(payload["rows"], args.epochs)
        atomic_write(args.markdown, lambda f: f.write(text.encode()))


if __name__ == "__main__":
    sys.exit(main())
