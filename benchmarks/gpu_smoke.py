#!/usr/bin/env python
"""The real commands, end to end, on one device: what `benchmarks/gpu.sh` proves on a GPU.

For each AMP dtype and each head (dcq, fc, pfc): `dcq train` --steps steps (30; checkpoint there),
`dcq train --resume` to twice that; then, for the last dtype, `dcq eval` of the head's final.pt on the
set's val.bin and `dcq export` to ONNX. The three heads run side by side (one chain of commands
each); every command's exit code and wall time go to --json, and the exit code is 1 if any failed.

    python benchmarks/gpu_smoke.py --out runs/smoke --device cuda --amps fp16 bf16 \\
        --set backbone=iresnet18 image_size=112 embedding_size=512 --synth --identities 200 --image-size 112
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HEADS = ("dcq", "fc", "pfc")


def dcq(*args: str) -> list[str]:
    return [sys.executable, "-m", "dcq", *args]


def run(command: list[str], log: Path) -> dict:
    started = time.time()
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    return {"command": " ".join(command[3:]), "exit": code, "seconds": round(time.time() - started, 1)}


def chain(head: str, args, data: Path) -> list[dict]:
    """train -> resume (every dtype), eval + export (last dtype); stops at the first failure."""
    rows = []
    for amp in args.amps:
        out = args.out / f"{head}-{amp}"
        log = args.out / f"{head}-{amp}.log"
        common = ["--set", f"train_data={data}", "--set", f"head={head}", "--set", f"amp={amp}",
                  "--set", f"device={args.device}", "--set", f"output={out}", "--set", "batch_size=32",
                  "--set", "log_every=10", "--set", "progress=false",
                  "--set", "workers=2", "--set", "eval_bins=[]", "--set", "queue_fraction=0.25",
                  *[x for kv in args.set for x in ("--set", kv)]]
        half = args.steps
        common += ["--set", f"checkpoint_every={half}"]
        steps = [dcq("train", *common, "--set", f"max_steps={half}", "--overwrite"),
                 dcq("train", *common, "--set", f"max_steps={2 * half}", "--resume")]
        if amp == args.amps[-1]:
            final = str(out / "final.pt")
            steps += [dcq("eval", final, "--bin", str(data / "val.bin"), "--json", str(out / "eval.json")),
                      dcq("export", final, "--onnx", str(out / "model.onnx"))]
        for command in steps:
            row = {"head": head, "amp": amp, **run(command, log)}
            rows.append(row)
            print(f"{head:4s} {amp:5s} exit {row['exit']:3d} {row['seconds']:6.1f}s  {row['command']}", flush=True)
            if row["exit"] != 0:
                print(log.read_text()[-3000:], file=sys.stderr)
                return rows
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--amps", nargs="+", default=["fp16", "bf16"], choices=("none", "bf16", "fp16"))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides for every run")
    p.add_argument("--synth", nargs=argparse.REMAINDER, default=[], help="arguments of `dcq synth` (last)")
    p.add_argument("--steps", type=int, default=30, help="steps before the checkpoint; --resume runs as many more")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "data"
    synth = run(dcq("synth", str(data), "--profile", "ms1m", "--quiet", *args.synth), args.out / "synth.log")
    rows = [{"head": None, "amp": None, **synth}]
    if synth["exit"] == 0:
        with ThreadPoolExecutor(len(HEADS)) as pool:
            for head_rows in pool.map(lambda h: chain(h, args, data), HEADS):
                rows += head_rows
    expected = 1 + len(HEADS) * (2 * len(args.amps) + 2)
    ok = len(rows) == expected and all(r["exit"] == 0 for r in rows)
    result = {"device": args.device, "amps": args.amps, "ok": ok, "commands": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"smoke: {'all' if ok else 'NOT all'} {expected} commands exited 0 ({len(rows)} ran)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
