#!/usr/bin/env python
"""One table and one JSON from the parts of `benchmarks/gpu.sh` (smoke, train_step, data_speed).

Writes DEST/gpu_summary.json with the keys: info, seconds, status, smoke {ok, commands, failed},
steps [{config, mode, classes, queue_size, samples_per_s, vs_backbone, peak_bytes, error}],
loader {decoder, workers, dcq_k2_items_per_s}, loader_vs_dcq_step (loader items/s over the default
DCQ row's samples/s: above 1, the loader keeps up).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dcq.bench import format_bytes
from dcq.tables import text_table


def read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summarise(dest: Path, info: str, seconds: float, status: int) -> dict:
    smoke = read(dest / "smoke.json") or {}
    commands = smoke.get("commands", [])
    steps = []
    for r in (read(dest / "train_step_gpu.json") or {}).get("rows", []):
        name = r["mode"] if r["mode"] == "backbone" else f"{r['mode']}@{r['classes']:g}"
        if r["mode"] == "dcq":
            name += f" q{r['queue_size']}"
        steps.append({"config": name, "mode": r["mode"], "classes": r["classes"], "queue_size": r["queue_size"],
                      "samples_per_s": r.get("samples_per_s"), "vs_backbone": r.get("vs_backbone"),
                      "peak_bytes": r.get("peak_bytes"), "error": r.get("error")})
    data = read(dest / "data_speed_gpu.json") or {}
    items = data.get("items_per_s", {})
    decoder = next((k for k in items if k.startswith("turbo")), next(iter(items), None))
    per_worker = items.get(decoder, {}).get("2", {}) if decoder else {}
    best = max(per_worker.items(), key=lambda kv: kv[1], default=(None, None))
    loader = {"decoder": decoder, "workers": int(best[0]) if best[0] is not None else None,
              "dcq_k2_items_per_s": best[1]}
    dcq_rows = [s for s in steps if s["mode"] == "dcq" and s["samples_per_s"]]
    ratio = (round(best[1] / dcq_rows[0]["samples_per_s"], 3) if best[1] and dcq_rows else None)
    return {"info": info, "seconds": seconds, "status": status,
            "smoke": {"ok": bool(smoke.get("ok")), "commands": len(commands),
                      "failed": [c["command"] for c in commands if c["exit"] != 0]},
            "steps": steps, "loader": loader, "loader_vs_dcq_step": ratio}


def table(summary: dict) -> str:
    rows = []
    for s in summary["steps"]:
        if s["error"]:
            rows.append([s["config"], s["error"], "", ""])
            continue
        peak = s["peak_bytes"] if isinstance(s["peak_bytes"], (str, type(None))) else format_bytes(s["peak_bytes"])
        rows.append([s["config"], f"{s['samples_per_s']:.0f}",
                     f"{s['vs_backbone']:.2f}" if s["vs_backbone"] else "-", peak or "-"])
    loader = summary["loader"]
    lines = [text_table(["config", "samples/s", "vs backbone", "peak"], rows, left=1)]
    lines.append(f"loader ({loader['decoder']}, {loader['workers']} workers): "
                 f"{loader['dcq_k2_items_per_s'] or 0:.0f} DCQ items/s at k=2; "
                 f"loader / first DCQ row: {summary['loader_vs_dcq_step']}")
    smoke = summary["smoke"]
    outcome = "all exit 0" if smoke["ok"] else f"failed: {smoke['failed']}"
    lines.append(f"smoke: {smoke['commands']} commands, {outcome}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dest", type=Path)
    p.add_argument("--info", default="")
    p.add_argument("--seconds", type=float, default=0.0)
    p.add_argument("--status", type=int, default=0)
    args = p.parse_args(argv)
    summary = summarise(args.dest, args.info, args.seconds, args.status)
    (args.dest / "gpu_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
