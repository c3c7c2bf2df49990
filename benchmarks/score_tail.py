"""Where low-FAR errors come from: each checkpoint's impostor-score tail and effective dimension.

TAR at FAR 1e-4..1e-6 is decided by the few highest impostor scores, so two models of equal
accuracy can differ there. For each checkpoint, on every pair of a held-out set (the one of
`convergence_paper.py`), this measures:

- genuine and impostor score mean and standard deviation (exact over all pairs: the impostor sums
  come from the embeddings' Gram matrix, ``sum_{i<j} s_ij^2 = (||X^T X||_F^2 - n) / 2``);
- the thresholds at FAR 1e-4 / 1e-5 / 1e-6 and TAR there (`dcq.eval.streamed_tar_at_far`);
- the participation ratio of the embeddings' covariance, ``(tr C)^2 / tr(C^2)``: an effective
  dimension (d for an isotropic embedding, 1 for one direction). Random unit vectors in d
  dimensions score with std 1/sqrt(d); an embedding that uses fewer directions has a wider
  impostor distribution and so a higher threshold at a low FAR;
- the length of the mean embedding (0 for a centred embedding; impostor mean ~ its square).

    python benchmarks/score_tail.py --heldout .dcq-cache/paper/heldout-2000x10-32px \\
        --model 'ms1m FC=.dcq-cache/paper/runs/ms1m-FC-seed0/final.pt' \\
        --model 'ms1m DCQ 10%=.dcq-cache/paper/runs/ms1m-DCQ_10pct-seed0/final.pt' \\
        --json benchmarks/results/score-tail.json

Rows are added to --json (rewritten atomically after each model); a label already there is skipped.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def score_tail(embeddings: np.ndarray, labels: np.ndarray) -> dict:
    """The statistics above for L2-normalised ``embeddings`` (N, d) with identity ``labels``."""
    from dcq.eval import streamed_tar_at_far

    x = np.asarray(embeddings, dtype=np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = np.asarray(labels)
    n = x.shape[0]
    total = x.sum(axis=0)
    all_sum = (total @ total - n) / 2  # sum over i<j of s_ij
    all_sq = (np.sum((x.T @ x) ** 2) - n) / 2  # sum over i<j of s_ij^2
    gen = []
    for label in np.unique(y):
        block = x[y == label] @ x[y == label].T
        gen.append(block[np.triu_indices(block.shape[0], 1)])
    gen = np.concatenate(gen)
    impostors = n * (n - 1) // 2 - gen.size
    imp_mean = (all_sum - gen.sum()) / impostors
    imp_var = (all_sq - np.sum(gen ** 2)) / impostors - imp_mean ** 2
    centred = x - x.mean(axis=0)
    eig = np.linalg.eigvalsh(centred.T @ centred / n)
    low = streamed_tar_at_far(x.astype(np.float32), y)
    return {"genuine_mean": float(gen.mean()), "genuine_std": float(gen.std()),
            "impostor_mean": float(imp_mean), "impostor_std": float(np.sqrt(max(imp_var, 0.0))),
            "thresholds": low["thresholds"], "tar_at_far": low["tar_at_far"],
            "participation_ratio": float(eig.sum() ** 2 / np.sum(eig ** 2)),
            "mean_norm": float(np.linalg.norm(x.mean(axis=0))), "dimension": int(x.shape[1]),
            "genuine_pairs": int(gen.size), "impostor_pairs": int(impostors)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heldout", default=None, help="held-out set folder (probes/<identity>/*.jpg)")
    parser.add_argument("--model", action="append", help="'label=checkpoint.pt' (none: only --markdown)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", required=True)
    parser.add_argument("--markdown", default=None, help="write a table of every row of --json here")
    args = parser.parse_args(argv)
    models = []
    for item in args.model or []:
        if "=" not in item:
            raise SystemExit(f"--model {item!r}: expected 'label=checkpoint.pt'")
        label, path = item.split("=", 1)
        if not Path(path).is_file():
            raise SystemExit(f"--model {label!r}: {path} is not a file")
        models.append((label, path))

    import torch

    from convergence import load_payload, write_payload
    from convergence_paper import load_heldout
    from dcq.encoders import embed_images, load_encoder

    torch.set_num_threads(args.threads)
    if models and not (Path(args.heldout or "") / "probes").is_dir():
        raise SystemExit(f"--heldout {args.heldout}: no probes/ folder; give the held-out set of "
                         "convergence_paper.py (its --cache holds heldout-<ids>x<per>-<size>px)")
    images, labels = load_heldout(Path(args.heldout)) if models else (None, None)
    payload = load_payload(args.json)
    for label, path in models:
        if any(r["label"] == label for r in payload["rows"]):
            print(f"{label}: already in {args.json}; skipped", file=sys.stderr)
            continue
        t0 = time.time()
        encoder, info, _ = load_encoder(path)
        row = {"label": label, "checkpoint": path, "encoder": info["which"],
               **score_tail(embed_images(encoder, images, batch_size=256), labels)}
        row["seconds"] = time.time() - t0
        payload["rows"].append(row)
        write_payload(args.json, payload)
        print(f"{label}: impostor std {row['impostor_std']:.4f}, participation ratio "
              f"{row['participation_ratio']:.1f}/{row['dimension']}, thresholds "
              + ", ".join(f"{k} {v:.3f}" for k, v in row["thresholds"].items())
              + ", TAR " + ", ".join(f"{k} {v:.3f}" for k, v in row["tar_at_far"].items()), file=sys.stderr)
    if args.markdown:
        from dcq.atomic import atomic_write

        text = markdown(payload["rows"])
        atomic_write(args.markdown, lambda f: f.write(text.encode()))
    return 0


FARS = ("1e-4", "1e-5", "1e-6")


def _number(value) -> str:
    """A FAR too low for the set's impostor pairs has no threshold: 'n/a'."""
    return "n/a" if value is None else f"{value:.3f}"


def markdown(rows: list[dict]) -> str:
    lines = ["| model | genuine mean | impostor mean | impostor std | effective dimension | threshold at "
             "FAR 1e-4 / 1e-5 / 1e-6 | TAR@FAR 1e-4 / 1e-5 / 1e-6 |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["label"]):
        lines.append(f"| {r['label']} | {r['genuine_mean']:.3f} | {r['impostor_mean']:.4f} | {r['impostor_std']:.3f} | "
                     f"{r['participation_ratio']:.1f} / {r['dimension']} | "
                     + " / ".join(_number(r["thresholds"][k]) for k in FARS) + " | "
                     + " / ".join(_number(r["tar_at_far"][k]) for k in FARS) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
