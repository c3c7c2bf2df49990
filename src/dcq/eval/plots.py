"""Evaluation figures: ROC (log FAR axis) and the long-tail bar chart.

Uses matplotlib's object API with the Agg canvas (no pyplot state, no display needed, safe in
training processes). Files are written atomically: a temporary file beside the target, then
``os.replace``, so a reader never sees half a PNG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dcq.atomic import atomic_write

__all__ = ["plot_longtail", "plot_roc"]


def _save(fig, out_png) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out = Path(out_png)
    FigureCanvasAgg(fig)
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    return out


def plot_roc(curves: dict, out_png, title: str = "Verification ROC") -> Path:
    """ROC curves {name: (fpr, tpr)} with FAR on a log axis (points with FAR = 0 cannot be shown)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    lowest = 1.0
    for name, curve in curves.items():
        fpr, tpr = (np.asarray(c, dtype=np.float64) for c in curve[:2])
        keep = fpr > 0
        if keep.any():
            lowest = min(lowest, float(fpr[keep].min()))
            ax.plot(fpr[keep], tpr[keep], label=str(name), linewidth=1.5)
    ax.set_xscale("log")
    ax.set_xlim(max(lowest, 1e-6), 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate (FAR)")
    ax.set_ylabel("true accept rate (TAR)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if curves:
        ax.legend(loc="lower right")
    return _save(fig, out_png)


def plot_longtail(results: dict, out_png, metric: str = "rank1",
                  title: str = "Rank-1 by training images per identity") -> Path:
    """Grouped bars: one group per bucket, one bar per model ({name: long-tail rows})."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    names = list(results)
    buckets: list[str] = []
    for rows in results.values():
        for r in rows:
            if r["bucket"] not in buckets:
                buckets.append(r["bucket"])
    x = np.arange(len(buckets))
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        by_bucket = {r["bucket"]: r.get(metric) for r in results[name]}
        values = [by_bucket.get(b) for b in buckets]
        heights = [0.0 if v is None else float(v) for v in values]
        bars = ax.bar(x - 0.4 + width * (j + 0.5), heights, width, label=str(name))
        for bar, v in zip(bars, values):
            ax.annotate("n/a" if v is None else f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels(buckets)
    ax.set_xlabel("training images per identity")
    ax.set_ylabel(metric)
    ax.set_ylim(0.0, 1.08)
    ax.set_title(title)
    if names:
        ax.legend(loc="upper left")
    return _save(fig, out_png)
