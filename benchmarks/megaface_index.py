"""MegaFace identification against 1M distractors: exact counting against the gallery's faiss indexes.

    python benchmarks/megaface_index.py [--distractors 1000000] [--dim 128] [--identities 80]
                                        [--images 10] [--k 100] [--methods ivf,flat,exact]

Random unit distractors (no cluster structure: the hard case for IVF), probes drawn around one random
centre per identity. Each method runs `dcq.eval.megaface.megaface_identification` on the full set once;
printed: wall time, rank-1, rank-10 and the ``"search"`` record (recall of the exact top k for an index).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--distractors", type=float, default=1e6)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--identities", type=int, default=80)
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--methods", default="ivf,flat,exact")
    args = parser.parse_args()

    from dcq.eval.megaface import megaface_identification

    rng = np.random.default_rng(0)
    n = int(args.distractors)
    labels = np.repeat(np.arange(args.identities), args.images)
    centres = rng.standard_normal((args.identities, args.dim)).astype(np.float32)
    probes = centres[labels] + 0.9 * rng.standard_normal((len(labels), args.dim)).astype(np.float32)
    distractors = rng.standard_normal((n, args.dim)).astype(np.float32)
    distractors /= np.linalg.norm(distractors, axis=1, keepdims=True)
    for method in args.methods.split(","):
        start = time.perf_counter()
        r = megaface_identification(probes, labels, distractors, sizes=[n], index=method, index_k=args.k)
        seconds = time.perf_counter() - start
        record = {k: v for k, v in r["search"][0].items() if k != "distractors"}
        print(f"{method}: {seconds:.1f} s, rank-1 {r['rank1'][0]:.4f}, "
              f"rank-10 {r['cmc'][0][r['cmc_ranks'].index(10)]:.4f}, {record}")


if __name__ == "__main__":
    main()
