"""The IJB 1:1 protocol at scale: time and peak memory of `dcq eval --ijb` on >= 100K synthetic crops.

    python benchmarks/ijb_scale.py --dir /tmp/ijb_scale [--identities 6500] [--impostor-pairs 15600000]
                                   [--model CKPT_OR_ONNX] [--image-size 40] [--json OUT]

1. ``dcq synth DIR --profile ijb`` (one process) unless ``DIR/stats.json`` already holds a set of
   the same settings; its time is reported but is not part of the protocol.
2. ``dcq eval MODEL --ijb DIR --json ...`` in a fresh child process with one thread
   (``OMP_NUM_THREADS=1``), so its peak RSS (``ru_maxrss`` of that child, from ``os.wait4``) is the
   protocol's alone: meta parsing, crops decoded, aligned and embedded in batches of ``--batch-size`` and pooled into
   per-template sums, then every template pair scored, both TAR rules and the ROC.

The default pair count mirrors IJB-C's (15,658,489 pairs, 19,557 of them genuine), so the scoring
stage is measured at full IJB-C size while the crops are fewer (IJB-C has 469,375). Without
``--model`` a randomly initialised cpunet (128-d) at ``--image-size`` is used: the timing does not
depend on the weights. The JSON (written atomically) holds the settings, the set's stats, the
stage times parsed from `dcq eval`'s report, total wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _synth(args, env) -> dict:
    stats_path = Path(args.dir) / "set" / "stats.json"
    want = {"identities": args.identities, "image_size": args.image_size, "seed": args.seed}
    if stats_path.is_file():
        stats = json.loads(stats_path.read_text())
        if all(stats.get(k) == v for k, v in want.items()) and stats.get("impostor_pairs") == args.impostor_pairs:
            print(f"reusing {stats_path.parent} ({stats['images']} crops)")
            return {"stats": stats, "seconds": None}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dcq", "synth", str(Path(args.dir) / "set"), "--profile", "ijb",
                    "--identities", str(args.identities), "--image-size", str(args.image_size),
                    "--seed", str(args.seed), "--impostor-pairs", str(args.impostor_pairs), "--quiet"],
                   check=True, env=env)
    return {"stats": json.loads(stats_path.read_text()), "seconds": time.perf_counter() - t0}


def _model(args) -> str:
    if args.model:
        return args.model
    import torch

    from dcq.checkpoint import save_checkpoint
    from dcq.models import get_backbone

    path = Path(args.dir) / f"cpunet-{args.image_size}.pt"
    if not path.is_file():
        torch.manual_seed(0)
        net = get_backbone("cpunet", embedding_size=128, image_size=args.image_size)
        save_checkpoint(path, {"model": {"backbone": "cpunet", "embedding_size": 128, "image_size": args.image_size},
                               "feature_extractor": net.state_dict(), "weight_generator": None})
    return str(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, help="work folder (the synthetic set is kept here between runs)")
    p.add_argument("--identities", type=int, default=6500, help="synthetic identities (~15.5 crops each)")
    p.add_argument("--impostor-pairs", type=int, default=15_638_932, help="IJB-C's impostor pair count")
    p.add_argument("--image-size", type=int, default=40, help="aligned face side in the crops = model input")
    p.add_argument("--model", help="checkpoint or .onnx to evaluate (default: a random cpunet)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "ijb_scale.json"))
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    synth = _synth(args, env)
    model = _model(args)
    out_json = Path(args.dir) / "eval.json"
    log = Path(args.dir) / "eval.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        child = subprocess.Popen([sys.executable, "-m", "dcq", "eval", model, "--ijb", str(Path(args.dir) / "set"),
                                  "--batch-size", str(args.batch_size), "--json", str(out_json)],
                                 env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own resource usage
    wall = time.perf_counter() - t0
    text = log.read_text()
    sys.stdout.write(text)
    if os.waitstatus_to_exitcode(status) != 0:
        return 1
    peak_mib = usage.ru_maxrss / 1024
    m = re.search(r"(\d+) crops embedded in ([\d.]+) s .*scored in ([\d.]+) s", text)
    result = {
        "settings": vars(args) | {"model": model, "threads": 1},
        "set": synth["stats"],
        "synth_seconds": synth["seconds"],
        "eval_wall_seconds": wall,
        "embed_pool_seconds": float(m.group(2)) if m else None,
        "score_tar_roc_seconds": float(m.group(3)) if m else None,
        "crops_per_second": int(m.group(1)) / float(m.group(2)) if m else None,
        "peak_rss_mib": peak_mib,
        "metrics": json.loads(out_json.read_text())["ijb"],
    }
    from dcq.atomic import atomic_write

    atomic_write(Path(args.json), lambda f: f.write((json.dumps(result, indent=1) + "\n").encode()))
    print(f"\n{synth['stats']['images']} crops, {synth['stats']['templates']} templates, "
          f"{synth['stats']['pairs']} pairs: dcq eval {wall:.1f} s wall on one thread, peak RSS {peak_mib:.0f} MiB")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
