"""Tables and plots of `convergence_paper.py`'s rows: accuracy and low-FAR TAR against epochs.

    python benchmarks/convergence_paper.py --report-only --json benchmarks/results/convergence-paper.json \\
        --plot-dir docs --markdown /tmp/paper.md

A run with fewer epochs than the others is shown as it stands (its last recorded epoch), marked
"partial", so tables made while the runs go on say what is missing.
"""

from __future__ import annotations

from pathlib import Path

FARS = ("1e-4", "1e-5", "1e-6")
BUCKETS = ("1-2", "3-9")


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _cell(values, digits=4) -> str:
    """'mean (a / b)' over seeds."""
    mean = _mean(values)
    if mean is None:
        return "n/a"
    shown = [f"{v:.{digits}f}" if v is not None else "n/a" for v in values]
    return f"{mean:.{digits}f}" + (f" ({' / '.join(shown)})" if len(values) > 1 else "")


def last_rows(rows: list[dict], profile: str, run: str) -> list[dict]:
    """Each seed's row at the last epoch all of this run's seeds reached."""
    mine = [r for r in rows if r["profile"] == profile and r["run"] == run]
    seeds = sorted({r["seed"] for r in mine})
    epoch = min(max(r["epoch"] for r in mine if r["seed"] == s) for s in seeds)
    return sorted((r for r in mine if r["epoch"] == epoch), key=lambda r: r["seed"])


def markdown(rows: list[dict], epochs: int = 8) -> str:
    lines = []
    for profile in dict.fromkeys(r["profile"] for r in rows):
        mine = [r for r in rows if r["profile"] == profile]
        first = mine[0]
        longtail = any(r.get("rank1_buckets") for r in mine)
        lines += [f"### {profile}-like: {first['identities']:,} identities, {first['images']:,} images; "
                  f"held-out: {first['impostor_pairs']:,} impostor and {first['genuine_pairs']:,} genuine pairs",
                  "", "At each run's last epoch (mean over seeds, each seed in brackets; impostor scores above "
                  "the threshold in the header):", "",
                  "| run | queue / batch | epoch | seeds | accuracy | "
                  + " | ".join(f"TAR@FAR={f} ({first['impostors_above'][f]:,})" for f in FARS) + " |"
                  + "".join(f" rank-1 {b} |" for b in BUCKETS if longtail),
                  "|---|---|---|---|---|---|---|---|" + "---|" * (len(BUCKETS) if longtail else 0)]
        for run in dict.fromkeys(r["run"] for r in mine):
            final = last_rows(rows, profile, run)
            epoch = final[0]["epoch"]
            queue = final[0]["queue_batches"]
            buckets = "".join(f"{_cell([r['rank1_buckets'].get(b) for r in final], 3)} | "
                              for b in BUCKETS) if longtail else ""
            lines.append(f"| {run} | {'-' if queue is None else f'{queue:g}'} | "
                         f"{epoch}{'' if epoch >= epochs else ' (partial)'} | "
                         f"{','.join(str(r['seed']) for r in final)} | {_cell([r['accuracy'] for r in final])} | "
                         + " | ".join(_cell([r["tar_at_far"][f] for r in final], 3) for f in FARS)
                         + f" | {buckets}".rstrip())
        seen = sorted({r["epoch"] for r in mine})
        for key, title, digits in (("accuracy", "Accuracy", 4), ("1e-5", "TAR@FAR=1e-5", 3)):
            lines += ["", f"{title} against epochs (mean over the seeds recorded at that epoch):", "",
                      "| run | " + " | ".join(str(e) for e in seen) + " |", "|---|" + "---|" * len(seen)]
            for run in dict.fromkeys(r["run"] for r in mine):
                cells = []
                for e in seen:
                    at = [r for r in mine if r["run"] == run and r["epoch"] == e]
                    value = _mean([r["accuracy"] if key == "accuracy" else r["tar_at_far"][key] for r in at])
                    cells.append("" if value is None else f"{value:.{digits}f}")
                lines.append(f"| {run} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["The issue's test (DCQ 10% against FC):", ""] + [f"- {v}" for v in verdict(rows, epochs)] + [""]
    return "\n".join(lines)


def verdict(rows: list[dict], epochs: int = 8, seeds: tuple[int, ...] = (0, 1)) -> list[str]:
    """The issue's test, per profile: at the last epoch, mean over `seeds`, DCQ-10% against FC
    (ms1m: accuracy within 0.5 point, TAR@FAR=1e-4 within 0.02; mf2: rank-1 >= FC on the 1-2 and
    3-9 buckets), or what is still missing; at the latest epoch both reached so far otherwise."""
    lines = []
    for profile in dict.fromkeys(r["profile"] for r in rows):
        at = {(r["run"], r["seed"], r["epoch"]): r for r in rows if r["profile"] == profile}
        complete = all((run, s, epochs) in at for run in ("FC", "DCQ 10%") for s in seeds)
        common = [e for e in range(epochs, 0, -1)
                  if any(("FC", s, e) in at and ("DCQ 10%", s, e) in at for s in seeds)]
        if not common:
            lines.append(f"{profile}: not measured (no epoch with both FC and DCQ 10%)")
            continue
        e = epochs if complete else common[0]
        pairs = [(at[("FC", s, e)], at[("DCQ 10%", s, e)]) for s in seeds
                 if ("FC", s, e) in at and ("DCQ 10%", s, e) in at]
        fc = {k: _mean([f[k] if k == "accuracy" else f["tar_at_far"]["1e-4"] for f, _ in pairs])
              for k in ("accuracy", "tar")}
        dcq = {k: _mean([d[k] if k == "accuracy" else d["tar_at_far"]["1e-4"] for _, d in pairs])
               for k in ("accuracy", "tar")}
        where = (f"epoch {e}, mean of seeds {','.join(str(f['seed']) for f, _ in pairs)}"
                 + ("" if complete else " (partial: not the issue's test yet)"))
        text = (f"{profile} ({where}): accuracy DCQ {dcq['accuracy']:.4f} vs FC {fc['accuracy']:.4f} "
                f"({100 * (dcq['accuracy'] - fc['accuracy']):+.2f} points), TAR@FAR=1e-4 "
                f"{dcq['tar']:.3f} vs {fc['tar']:.3f} ({dcq['tar'] - fc['tar']:+.3f})")
        if profile == "mf2":
            for b in BUCKETS:
                f_b = _mean([f["rank1_buckets"].get(b) for f, _ in pairs])
                d_b = _mean([d["rank1_buckets"].get(b) for _, d in pairs])
                text += f", rank-1 {b} {d_b:.3f} vs {f_b:.3f}"
            holds = all(_mean([d["rank1_buckets"].get(b) for _, d in pairs])
                        >= _mean([f["rank1_buckets"].get(b) for f, _ in pairs]) for b in BUCKETS)
        else:
            holds = dcq["accuracy"] >= fc["accuracy"] - 0.005 and dcq["tar"] >= fc["tar"] - 0.02
        lines.append(text + (f": {'holds' if holds else 'does not hold'}" if complete else ""))
    return lines


def plot(rows: list[dict], folder) -> None:
    """One figure per profile: accuracy and TAR@FAR=1e-5 against epochs; mean over seeds bold,
    each seed faint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from dcq.atomic import atomic_write

    for profile in dict.fromkeys(r["profile"] for r in rows):
        mine = [r for r in rows if r["profile"] == profile]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, (label, value) in zip(axes, (("held-out verification accuracy", lambda r: r["accuracy"]),
                                             ("TAR@FAR=1e-5 (all held-out pairs)",
                                              lambda r: r["tar_at_far"]["1e-5"]))):
            for i, run in enumerate(dict.fromkeys(r["run"] for r in mine)):
                by_seed: dict[int, dict[int, float]] = {}
                for r in mine:
                    if r["run"] == run and value(r) is not None:
                        by_seed.setdefault(r["seed"], {})[r["epoch"]] = value(r)
                if not by_seed:
                    continue
                for curve in by_seed.values():
                    ax.plot(sorted(curve), [curve[e] for e in sorted(curve)], color=f"C{i}", alpha=0.3, lw=1)
                epochs = sorted(set.intersection(*(set(c) for c in by_seed.values())))
                ax.plot(epochs, [np.mean([c[e] for c in by_seed.values()]) for e in epochs], color=f"C{i}",
                        marker="o", ms=3, lw=2, label=f"{run} ({len(by_seed)} seed{'s' * (len(by_seed) > 1)})")
            ax.set_xlabel("epoch")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        first = mine[0]
        fig.suptitle(f"{profile}-like, {first['identities']:,} identities, {first['images']:,} images, batch 64")
        fig.tight_layout()
        atomic_write(Path(folder) / f"convergence-paper-{profile}.png",
                     lambda f: fig.savefig(f, format="png", dpi=100))
        plt.close(fig)
