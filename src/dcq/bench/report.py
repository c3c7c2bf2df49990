"""Output of `dcq bench heads`: the table, the summary lines, the JSON document and the plot."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dcq.atomic import atomic_write
from dcq.atomic import write_json as atomic_json
from dcq.bench.units import format_bytes
from dcq.errors import DcqError
from dcq.tables import text_table


def row_label(row: dict[str, Any]) -> str:
    if row["head"] == "fc":
        return "fc"
    if row["head"] == "pfc":
        return f"pfc {row['sample_rate']:g}"
    return f"dcq q={row['queue_size']}"


def _reference_rows(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per number of classes, the DCQ row with the fixed queue (the first DCQ row of that N)."""
    ref: dict[int, dict[str, Any]] = {}
    for row in rows:
        if row["head"] == "dcq" and row["classes"] not in ref:
            ref[row["classes"]] = row
    return ref


def _ratio(value, base) -> str:
    if value is None or not base:
        return "-"
    r = value / base
    return f"{r:.0f}x" if r >= 100 else f"{r:.2f}x" if r >= 0.01 else f"{r:.1e}x"


def format_table(rows: list[dict[str, Any]]) -> str:
    refs = _reference_rows(rows)
    header = ["classes", "head", "step ms", "vs dcq", "state", "vs dcq", "peak", "vs dcq"]
    lines = []
    for row in rows:
        ref = refs.get(row["classes"], {})
        if row.get("error"):
            lines.append([f"{row['classes']:,}", row_label(row), row["error"], "", "", "", "", ""])
            continue
        lines.append([
            f"{row['classes']:,}", row_label(row), f"{row['step_ms']:.2f}",
            _ratio(row["step_ms"], ref.get("step_ms")), format_bytes(row["state_bytes"]),
            _ratio(row["state_bytes"], ref.get("state_bytes")), format_bytes(row["peak_bytes"]),
            _ratio(row["peak_bytes"], ref.get("peak_bytes")),
        ])
    return "\n".join([text_table(header, lines, left=2),
                      "ratios ('vs dcq') are to DCQ with the fixed queue at the same number of classes"])


def summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    """How DCQ's step time scales, and the state-memory ratios at the largest size."""
    refs = {n: r for n, r in _reference_rows(rows).items() if not r.get("error")}
    lines = []
    if len(refs) >= 2:
        lo, hi = min(refs), max(refs)
        lines.append(f"dcq q={refs[lo]['queue_size']} step time {lo:,} -> {hi:,} classes: "
                     f"{refs[hi]['step_ms'] / refs[lo]['step_ms']:.2f}x")
    if refs:
        n = max(refs)
        for row in rows:
            if row["classes"] == n and row["head"] in ("fc", "pfc"):
                what = row["error"] if row.get("error") else (
                    f"state {_ratio(row['state_bytes'], refs[n]['state_bytes'])} dcq's")
                lines.append(f"{row_label(row)} at {n:,} classes: {what}")
    fcs = sorted((r["classes"], r["state_bytes"]) for r in rows if r["head"] == "fc" and not r.get("error"))
    if len(fcs) >= 2:
        (n0, s0), (n1, s1) = fcs[0], fcs[-1]
        lines.append(f"fc state {n0:,} -> {n1:,} classes: {s1 / s0:.1f}x for {n1 / n0:.0f}x the classes")
    return lines


def check_output_path(path: str | os.PathLike, what: str = "output") -> Path:
    """Fail early (before a long benchmark) if `path` cannot be written."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise DcqError(f"{what} {target}: folder {folder} does not exist; create it or choose another path")
    if target.is_dir():
        raise DcqError(f"{what} {target}: is a folder; give a file name")
    if not os.access(folder, os.W_OK):
        raise DcqError(f"{what} {target}: folder {folder} is not writable; choose another path")
    return target


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON atomically (temporary file in the same folder, then rename)."""
    target = check_output_path(path)
    atomic_json(target, payload)


def plot_title(config: dict[str, Any]) -> str:
    return (f"head step: batch {config['batch']}, dim {config['dim']}, {config['device']} "
            f"{config['dtype']}, {config['threads']} threads ({config.get('processor', '')})")


def save_plot(rows: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """Log-log step time and state memory against classes, one line per head variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[dict[str, Any]]] = {}
    refs = _reference_rows(rows)
    for row in rows:
        if row["head"] == "dcq":
            fixed = row is refs.get(row["classes"])
            key = f"DCQ, queue {row['queue_size']}" if fixed else "DCQ, queue = fraction of N"
        elif row["head"] == "pfc":
            key = f"Partial FC, rate {row['sample_rate']:g}"
        else:
            key = "FC"
        series.setdefault(key, []).append(row)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, items in series.items():
        ok = [r for r in items if not r.get("error")]
        oom = [r["classes"] for r in items if r.get("error")]
        label = key + (f" (not run at {', '.join(f'{n:.0e}' for n in oom)})" if oom else "")
        if not ok:
            axes[0].plot([], [], marker="x", linestyle="none", label=label)
            continue
        xs = [r["classes"] for r in ok]
        axes[0].plot(xs, [r["step_ms"] for r in ok], marker="o", label=label)
        axes[1].plot(xs, [r["state_bytes"] / 2**20 for r in ok], marker="o", label=key)
    axes[0].set_ylabel("step time (ms)")
    axes[1].set_ylabel("head state (MiB)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("number of classes (identities)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    target = check_output_path(path)
    try:
        atomic_write(target, lambda f: fig.savefig(f, format=target.suffix.lstrip(".").lower() or "png", dpi=120))
    finally:
        plt.close(fig)
