"""Gallery search at scale: queries/s and recall@10 of exact numpy, faiss flat, IVF and HNSW, one run.

    python benchmarks/gallery_speed.py --n 1e6 --dim 512 --queries 1000 [--nlist 1024]
        [--nprobe 8,16,32,64] [--ef 32,64,128,256] [--hnsw-m 32] [--repeats 3] [--json OUT]

One thread everywhere (BLAS, faiss's OpenMP). The gallery is synthetic but clustered the way face
embeddings are: ``--groups`` broad groups (think demographics), identities inside a group share a
component of the group's direction (centre cosine ``--group-share`` squared within a group, ~0
across groups), and each image is its identity's centre plus independent noise so that two images
of one identity have cosine ``--genuine`` in expectation. Queries are new images of enrolled
identities. Recall@10 of a method = the share of the exact top 10 (numpy, float32) it returns.

Memory: the vectors are held once, in the flat storage of the faiss ``IndexHNSWFlat`` (what `dcq
gallery build --index hnsw` makes); faiss's flat search and numpy's exact search read that same
buffer. IVF (`dcq.deploy.gallery.Gallery.build(kind="ivf")`, the command's own code) holds its own
copy. So about 2 x N x dim x 4 bytes plus the HNSW graph: ~4.5 GiB at 1M x 512.

Every search configuration is built first; then each repeat runs every configuration once over
all queries (one batched search call), in a rotating order, and the median time is reported.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy and faiss load their thread pools

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dcq.atomic import atomic_write  # noqa: E402
from dcq.deploy.gallery import Gallery, exact_search, load_faiss  # noqa: E402


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class FaceLikeVectors:
    """Identity centres drawn group by group; images = centre * sqrt(g) + noise * sqrt(1 - g)."""

    def __init__(self, dim: int, identities: int, groups: int, group_share: float, genuine: float, seed: int):
        rng = np.random.default_rng(seed)
        self.dim, self.genuine, self.seed = dim, genuine, seed
        group_dirs = _unit(rng.standard_normal((groups, dim)))
        self.group = rng.integers(0, groups, identities)
        own = _unit(rng.standard_normal((identities, dim)))
        self.centres = _unit(group_share * group_dirs[self.group] + np.sqrt(1 - group_share**2) * own)
        self.centres = self.centres.astype(np.float32)

    def images(self, identity: np.ndarray, stream: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, stream])
        noise = _unit(rng.standard_normal((len(identity), self.dim)).astype(np.float32))
        x = np.sqrt(self.genuine) * self.centres[identity] + np.sqrt(1 - self.genuine) * noise
        return _unit(x).astype(np.float32)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=float, default=1e6, help="gallery vectors (default 1e6)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--images-per-identity", type=int, default=5, help="gallery images per identity (default 5)")
    p.add_argument("--groups", type=int, default=64)
    p.add_argument("--group-share", type=float, default=0.4)
    p.add_argument("--genuine", type=float, default=0.65, help="expected cosine of two images of one identity")
    p.add_argument("--nlist", type=int, default=1024, help="IVF cells (default 1024)")
    p.add_argument("--nprobe", default="8,16,32,64", help="IVF cells scanned per query, comma-separated")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=80)
    p.add_argument("--ef", default="32,64,128,256", help="HNSW efSearch values, comma-separated")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    faiss = load_faiss("benchmarks/gallery_speed.py")
    faiss.omp_set_num_threads(1)
    n, d, k = int(args.n), args.dim, 10
    t0 = time.perf_counter()
    people = max(1, n // args.images_per_identity)
    gen = FaceLikeVectors(d, people, args.groups, args.group_share, args.genuine, args.seed)
    # The HNSW graph is built while the vectors go in; its flat storage then serves faiss flat and numpy.
    hnsw = faiss.IndexHNSWFlat(d, args.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = args.ef_construction
    block, hnsw_s = 1 << 16, 0.0
    for start in range(0, n, block):  # identity of row r: r % people, so every identity gets its images
        x = gen.images(np.arange(start, min(n, start + block)) % people, stream=1 + start // block)
        t = time.perf_counter()
        hnsw.add(x)
        hnsw_s += time.perf_counter() - t
    flat = faiss.downcast_index(hnsw.storage)
    vectors = faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d)  # numpy view of faiss's buffer
    query_ids = np.random.default_rng([args.seed, 999]).integers(0, people, args.queries)
    queries = gen.images(query_ids, stream=10**6)
    gen_s = time.perf_counter() - t0
    print(f"gallery {n:,} x {d} ({people:,} identities), {len(queries)} queries, generated and HNSW{args.hnsw_m} "
          f"(efConstruction {args.ef_construction}) built in {gen_s:.0f} s (HNSW: {hnsw_s:.0f} s); "
          f"peak RSS {_peak_rss_gib():.2f} GiB", flush=True)

    t = time.perf_counter()
    truth, truth_s = exact_search(queries, vectors, k)
    exact_once = time.perf_counter() - t
    same = np.mean((np.asarray(truth) % people) == query_ids[:, None])
    s_gen = float(np.mean(np.sum(queries * vectors[query_ids], axis=1)))  # row i is an image of identity i
    print(f"exact top-{k} in {exact_once:.1f} s; {same:.3f} of the top-{k} are the query's identity; "
          f"mean cosine to an enrolled image of the same identity {s_gen:.3f}, top-10th score "
          f"{float(np.mean(truth_s[:, -1])):.3f}", flush=True)

    configs: dict[str, tuple[dict, object]] = {}
    configs["numpy exact"] = ({"kind": "exact", "engine": "numpy"}, lambda: exact_search(queries, vectors, k))

    def faiss_flat():
        s, i = flat.search(queries, k)
        return i, s

    configs["faiss flat"] = ({"kind": "exact", "engine": "faiss IndexFlatIP"}, faiss_flat)
    builds = {}
    t = time.perf_counter()
    ivf = Gallery.build(vectors, kind="ivf", nlist=args.nlist, seed=args.seed)
    builds["ivf"] = time.perf_counter() - t
    print(f"IVF{args.nlist} built in {builds['ivf']:.0f} s; peak RSS {_peak_rss_gib():.2f} GiB", flush=True)
    for nprobe in [int(v) for v in args.nprobe.split(",")]:
        configs[f"IVF{args.nlist} nprobe={nprobe}"] = (
            {"kind": "ivf", "nlist": args.nlist, "nprobe": nprobe},
            lambda nprobe=nprobe: ivf.search(queries, k, nprobe=nprobe))
    builds["hnsw"] = hnsw_s
    for ef in [int(v) for v in args.ef.split(",")]:
        def run(ef=ef):
            hnsw.hnsw.efSearch = max(ef, k)
            s, i = hnsw.search(queries, k)
            return i, s

        configs[f"HNSW{args.hnsw_m} efSearch={ef}"] = ({"kind": "hnsw", "M": args.hnsw_m, "ef_search": ef}, run)

    names = list(configs)
    times: dict[str, list[float]] = {name: [] for name in names}
    recall: dict[str, float] = {}
    for r in range(args.repeats):
        for j in range(len(names)):
            name = names[(j + r) % len(names)]
            t = time.perf_counter()
            ids, _ = configs[name][1]()
            times[name].append(time.perf_counter() - t)
            hits = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(np.asarray(ids), truth)]
            recall[name] = float(np.mean(hits) / k)
        print(f"repeat {r + 1}/{args.repeats} done", flush=True)
    base = len(queries) / float(np.median(times["numpy exact"]))
    rows = []
    for name in names:
        qps = len(queries) / float(np.median(times[name]))
        rows.append({"method": name, **configs[name][0], "queries_per_s": qps, "speedup_vs_numpy": qps / base,
                     "recall_at_10": recall[name], "seconds": times[name]})
    print("\n| method | queries/s (1 thread) | × numpy exact | recall@10 vs exact |\n|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['method']} | {row['queries_per_s']:,.0f} | {row['speedup_vs_numpy']:.1f} | "
              f"{row['recall_at_10']:.3f} |")
    result = {"n": n, "dim": d, "queries": len(queries), "identities": people, "groups": args.groups,
              "group_share": args.group_share, "genuine": args.genuine, "k": k, "repeats": args.repeats,
              "build_s": builds, "generate_s": gen_s, "exact_same_identity_share": float(same),
              "peak_rss_gib": _peak_rss_gib(), "rows": rows, "command": " ".join(sys.argv)}
    print(f"\npeak RSS {result['peak_rss_gib']:.2f} GiB; builds: IVF {builds['ivf']:.0f} s, "
          f"HNSW {builds['hnsw']:.0f} s")
    if args.json:
        atomic_write(args.json, lambda f: f.write((json.dumps(result, indent=1) + "\n").encode()))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
