"""Gallery search at 100k and 1M vectors: HNSW (FAISS, as jobs.index builds it) vs exact.

Synthetic vectors of the export's embedding size (``--dim``, default: the ``small``
model's), drawn as a mixture of ``--clusters`` Gaussian clusters (embeddings of a real
corpus cluster by class; uniform random vectors are the ANN worst case and are reported
too with ``--uniform``). Queries are fresh draws from the same mixture. For each size:
build time, then per ``ef_search``: single-query p50/p99 latency and recall@10 against
exact (numpy brute force) top-10, plus the exact search's own latency.

Goal (issue #20): recall@10 >= 0.95 and p99 <= 20 ms at 1M on this machine.

Usage (the quiet full run; 1M build ~5-10 min on 2 cores)::

    python benchmarks/ann_search.py --sizes 100000 1000000 --queries 1000 \
        --out benchmarks/results/ann_search.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# One BLAS thread: the exact baseline's latency is a single core's, as the service's is.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def mixture(n: int, dim: int, clusters: int, rng: np.random.Generator, centers=None):
    if centers is None:
        centers = rng.normal(size=(clusters, dim)).astype(np.float32)
    lab = rng.integers(0, len(centers), size=n)
    x = centers[lab] + rng.normal(scale=0.6, size=(n, dim)).astype(np.float32)
    return x, centers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=None, help="default: the small model's embed_dim")
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--uniform", action="store_true", help="uniform random vectors instead")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--m", type=int, default=32)
    ap.add_argument("--ef-construction", type=int, default=80)
    ap.add_argument("--ef-search", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--threads", type=int, default=None, help="FAISS build threads")
    ap.add_argument("--out", default="benchmarks/results/ann_search.json")
    ap.add_argument(
        "--cache",
        default=None,
        help="folder for built indexes: a later run with the same size/dim/M/efConstruction "
        "loads the index (its build time is the one recorded at build) instead of rebuilding, "
        "so a slow 1M build can run apart from the latency measurement",
    )
    ap.add_argument("--build-only", action="store_true", help="build (and cache) indexes, no search")
    a = ap.parse_args(argv)

    import faiss

    from jobs.embedding.index import HnswIndex, exact_topk, normalize
    from models import OmniConfig

    if a.threads:
        faiss.omp_set_num_threads(a.threads)
    dim = a.dim or OmniConfig.from_name("small").embed_dim
    load0 = os.getloadavg()[0]
    results = []
    for n in a.sizes:
        # One generator per size: the same vectors whatever other sizes this run has.
        rng = np.random.default_rng([0, n, int(a.uniform)])
        if a.uniform:
            base = rng.normal(size=(n, dim)).astype(np.float32)
            queries = rng.normal(size=(a.queries, dim)).astype(np.float32)
        else:
            base, centers = mixture(n, dim, a.clusters, rng)
            queries, _ = mixture(a.queries, dim, a.clusters, rng, centers)
        base, queries = normalize(base), normalize(queries)
        key = f"{'uniform' if a.uniform else f'mix{a.clusters}'}_n{n}_d{dim}_m{a.m}_efc{a.ef_construction}"
        cached = Path(a.cache) / f"{key}.faiss" if a.cache else None
        if cached is not None and cached.exists():
            index = HnswIndex.load(cached, a.ef_search[0])
            build_s = json.loads(cached.with_suffix(".json").read_text())["build_s"]
            build_how = "loaded from cache (build time recorded when built)"
        else:
            t = time.perf_counter()
            index = HnswIndex(dim, a.m, a.ef_construction, a.ef_search[0])
            index.add(base)
            build_s = time.perf_counter() - t
            build_how = f"built in this run (load avg {os.getloadavg()[0]:.1f})"
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                index.save(cached)
                cached.with_suffix(".json").write_text(
                    json.dumps({"build_s": round(build_s, 1), "loadavg_1min": os.getloadavg()[0]})
                )
        print(f"n={n}: index {build_how}, {build_s:.1f} s", file=sys.stderr, flush=True)
        if a.build_only:
            del base, index
            continue
        t = time.perf_counter()
        truth = exact_topk(base, queries, a.k)
        exact_batch_s = time.perf_counter() - t
        lat = []
        for q in queries[: min(100, len(queries))]:
            t = time.perf_counter()
            s = base @ q
            np.argpartition(-s, a.k)[: a.k]
            lat.append((time.perf_counter() - t) * 1000)
        entry = {
            "n": n,
            "dim": dim,
            "build_s": round(build_s, 1),
            "build": build_how,
            "exact": {
                "p50_ms": round(float(np.percentile(lat, 50)), 3),
                "p99_ms": round(float(np.percentile(lat, 99)), 3),
                "batch_all_queries_s": round(exact_batch_s, 2),
            },
            "hnsw": [],
        }
        for ef in a.ef_search:
            index.index.hnsw.efSearch = ef
            lat, hits = [], []
            for q, tr in zip(queries, truth, strict=True):
                t = time.perf_counter()
                idx, _ = index.search(q, a.k)
                lat.append((time.perf_counter() - t) * 1000)
                hits.append(len(set(idx.tolist()) & set(tr.tolist())) / a.k)
            row = {
                "ef_search": ef,
                f"recall_at_{a.k}": round(float(np.mean(hits)), 4),
                "p50_ms": round(float(np.percentile(lat, 50)), 3),
                "p99_ms": round(float(np.percentile(lat, 99)), 3),
            }
            entry["hnsw"].append(row)
            print(f"n={n} {row}", file=sys.stderr, flush=True)
        results.append(entry)
        del base, index
    if a.build_only:
        return 0
    out = {
        "benchmark": "ann_search",
        "library": f"faiss {faiss.__version__} IndexHNSWFlat (inner product, M={a.m}, efConstruction={a.ef_construction})",
        "data": "uniform gaussian" if a.uniform else f"mixture of {a.clusters} gaussian clusters",
        "queries": a.queries,
        "machine": {"cpus": os.cpu_count()},
        "loadavg_1min_start": round(load0, 2),
        "loadavg_1min_end": round(os.getloadavg()[0], 2),
        "results": results,
        "command": "python benchmarks/ann_search.py " + " ".join(argv or sys.argv[1:]),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
