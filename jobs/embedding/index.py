"""Gallery indexes over an embedding directory: exact (numpy) or HNSW (FAISS).

``build_index(EMB_DIR)`` writes ``EMB_DIR/index/``: per modality either nothing but the
decision (``exact``: the service searches the part vectors by brute force, which costs
O(N·E) per query, ~1 ms per 10^5 vectors of E=128 on one core) or a FAISS
``IndexHNSWFlat`` over the L2-normalized vectors with the inner-product metric
(``<modality>.faiss``; ``hnsw``), plus ``index.json``: the kind, size and parameters of
each index, its recall@k against exact search measured on held-in queries (gallery
vectors with noise; ``ef_search`` is raised until it reaches ``target_recall``), and the
parts it was built from (a stale index is refused).

Row ``i`` of a modality's index is record ``i`` of that modality in the part files read
in name order (:func:`jobs.embedding.output.read_embeddings`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jobs.embedding.output import (
    INDEX_DIR,
    EmbeddingDirError,
    check_embedding_dir,
    part_files,
    read_embeddings,
)

INDEX_FILE = "index.json"
KINDS = ("auto", "exact", "hnsw")


@dataclass
class IndexConfig:
    """How ``jobs.index`` indexes each modality.

    Attributes:
        kind: ``exact``, ``hnsw`` or ``auto`` (exact up to ``exact_max`` vectors).
        exact_max: Largest gallery searched exactly under ``auto``.
        hnsw_m: HNSW graph degree (FAISS ``M``).
        ef_construction: HNSW build beam.
        ef_search: HNSW search beam (recall vs latency).
        target_recall: ``ef_search`` is doubled (up to ``max_ef_search``) until the
            measured recall@k reaches this (0 disables the tuning).
        max_ef_search: Largest ``ef_search`` the tuning tries.
        recall_queries: Queries of the recall measurement.
        recall_k: k of recall@k.
        seed: Seed of the recall queries.
    """

    kind: str = "auto"
    exact_max: int = 200_000
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 64
    target_recall: float = 0.95
    max_ef_search: int = 1024
    recall_queries: int = 200
    recall_k: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"index kind must be one of {list(KINDS)}, got {self.kind!r}")
        if min(self.hnsw_m, self.ef_construction, self.ef_search, self.recall_k) < 1:
            raise ValueError("hnsw_m, ef_construction, ef_search and recall_k must be >= 1")


def normalize(v: np.ndarray) -> np.ndarray:
    v = np.ascontiguousarray(v, dtype=np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) indices of the top-k inner products (vectors and queries normalized)."""
    out = []
    for s in range(0, len(queries), 256):
        sims = queries[s : s + 256] @ vectors.T  # (q, N)
        k_ = min(k, sims.shape[1])
        part = np.argpartition(-sims, k_ - 1, axis=1)[:, :k_]
        order = np.argsort(-np.take_along_axis(sims, part, 1), axis=1, kind="stable")
        out.append(np.take_along_axis(part, order, 1))
    return np.concatenate(out) if out else np.zeros((0, k), np.int64)


class HnswIndex:
    """FAISS ``IndexHNSWFlat`` (inner product) over L2-normalized vectors; the
    :class:`serve.gallery.GalleryIndex` protocol (``add``, ``search``, ``len``)."""

    def __init__(self, dim: int, m: int = 32, ef_construction: int = 80, ef_search: int = 64):
        import faiss

        self.index = faiss.IndexHNSWFlat(int(dim), int(m), faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = int(ef_construction)
        self.index.hnsw.efSearch = int(ef_search)

    @classmethod
    def load(cls, path: str | Path, ef_search: int) -> HnswIndex:
        import faiss

        self = cls.__new__(cls)
        self.index = faiss.read_index(str(path))
        self.index.hnsw.efSearch = int(ef_search)
        return self

    def save(self, path: str | Path) -> None:
        import faiss

        faiss.write_index(self.index, str(path))

    def add(self, vectors: np.ndarray) -> None:
        self.index.add(normalize(vectors))

    def search_many(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, idx = self.index.search(normalize(queries), int(k))
        return idx, scores

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of one (E,) query: ``(indices (k',), scores (k',))``, best first."""
        k = min(int(k), len(self))
        if k == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        idx, scores = self.search_many(np.asarray(query, np.float32).reshape(1, -1), k)
        keep = idx[0] >= 0
        return idx[0][keep].astype(np.int64), scores[0][keep].astype(np.float32)

    def __len__(self) -> int:
        return int(self.index.ntotal)


def recall_at_k(
    vectors: np.ndarray, index: HnswIndex, *, queries: int, k: int, seed: int
) -> dict[str, float]:
    """recall@k of ``index`` against exact search, with latency, on noisy gallery vectors.

    Queries are ``queries`` random gallery vectors plus Gaussian noise of a third of a
    vector's norm (so the query is near, not equal to, its source).
    """
    rng = np.random.default_rng(seed)
    n, dim = vectors.shape
    q = vectors[rng.integers(0, n, size=min(queries, max(n, 1)))]
    q = normalize(q + rng.normal(0, 1.0 / (3 * np.sqrt(dim)), q.shape).astype(np.float32))
    k = min(k, n)
    truth = exact_topk(vectors, q, k)
    lat, found = [], []
    for row in q:
        t = time.perf_counter()
        idx, _ = index.search(row, k)
        lat.append((time.perf_counter() - t) * 1000)
        found.append(idx)
    hits = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(found, truth, strict=True)]
    return {
        "recall": float(np.mean(hits)) if hits else 1.0,
        "queries": len(q),
        "k": k,
        "p50_ms": float(np.percentile(lat, 50)) if lat else 0.0,
        "p99_ms": float(np.percentile(lat, 99)) if lat else 0.0,
    }


def build_index(
    emb_dir: str | Path, config: IndexConfig | None = None, *, verbose: bool = False
) -> dict[str, Any]:
    """Builds ``emb_dir/index/`` (see the module docstring).

    Returns:
        The ``index.json`` content.

    Raises:
        EmbeddingDirError: not a finished embedding directory.
    """
    cfg = config or IndexConfig()
    d = Path(emb_dir)
    meta = check_embedding_dir(d)
    out = d / INDEX_DIR
    out.mkdir(exist_ok=True)
    records, _ = read_embeddings(d, vectors=False)
    mods = sorted(set(records.column("modality").to_pylist()))
    info: dict[str, Any] = {
        "revision": meta["revision"],
        "embed_dim": meta["embed_dim"],
        "parts": [{"name": f.name, "bytes": f.stat().st_size} for f in part_files(d)],
        "config": asdict(cfg),
        "modalities": {},
    }
    for m in mods:
        t0 = time.perf_counter()
        _, vec = read_embeddings(d, m)
        vec = normalize(vec)
        n = len(vec)
        kind = cfg.kind if cfg.kind != "auto" else ("exact" if n <= cfg.exact_max else "hnsw")
        entry: dict[str, Any] = {"kind": kind, "count": n}
        if kind == "hnsw":
            index = HnswIndex(vec.shape[1], cfg.hnsw_m, cfg.ef_construction, cfg.ef_search)
            index.add(vec)
            ef = cfg.ef_search
            while True:
                index.index.hnsw.efSearch = ef
                rec = recall_at_k(
                    vec, index, queries=cfg.recall_queries, k=cfg.recall_k, seed=cfg.seed
                )
                if rec["recall"] >= cfg.target_recall or ef * 2 > cfg.max_ef_search:
                    break
                ef *= 2
            path = out / f"{m}.faiss"
            index.save(path)
            entry.update(
                file=path.name,
                params={"M": cfg.hnsw_m, "ef_construction": cfg.ef_construction, "ef_search": ef},
                build_s=round(time.perf_counter() - t0, 3),
            )
            entry[f"recall_at_{cfg.recall_k}"] = rec
        else:
            entry[f"recall_at_{cfg.recall_k}"] = {"recall": 1.0, "note": "exact search"}
        info["modalities"][m] = entry
    tmp = out / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True))
    os.replace(tmp, out / INDEX_FILE)
    if verbose:
        summary = ", ".join(
            f"{m} {e['kind']} {e['count']} (recall@{cfg.recall_k} "
            f"{e[f'recall_at_{cfg.recall_k}']['recall']:.3f})"
            for m, e in info["modalities"].items()
        )
        print(f"jobs.index: {d / INDEX_DIR}: {summary}", file=sys.stderr, flush=True)
    return info


def read_index_info(emb_dir: str | Path) -> dict[str, Any] | None:
    """``index.json`` checked against the parts it was built from (``None``: no index).

    Raises:
        EmbeddingDirError: unreadable, or built from other parts (stale: rebuild it).
    """
    d = Path(emb_dir)
    p = d / INDEX_DIR / INDEX_FILE
    if not p.is_file():
        return None
    try:
        info = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EmbeddingDirError(f"unreadable {p}: {e}") from e
    now = [{"name": f.name, "bytes": f.stat().st_size} for f in part_files(d)]
    if info.get("parts") != now:
        raise EmbeddingDirError(
            f"{p} was built from other parts than {d / 'parts'} holds now: rebuild it with "
            f"`python -m jobs.index --embeddings {d}`"
        )
    return info
