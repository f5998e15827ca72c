"""The ``/v1/search`` gallery: one index per target modality, from one of two sources.

* A prepared split (``gallery.split_dir``): the router reads the split's Parquet shards
  (Contract 2), sends the featurized items to the modality replicas in chunks and indexes
  the (N, E) L2-normalized embeddings in an :class:`ExactCosineIndex`
  (:func:`build_galleries`).
* An embedding directory of ``jobs.embed`` (``gallery.embeddings_dir``): the vectors are
  loaded as they are, with the index ``jobs.index`` chose per modality: exact
  (:class:`ExactCosineIndex`, O(N·E) per query, ~1 ms per 10^5 vectors of E=128 on one
  core) or HNSW (:class:`jobs.embedding.index.HnswIndex`, FAISS, for large galleries); a
  hit names its segment and times (:func:`load_embedding_galleries`).

Any index implements the :class:`GalleryIndex` protocol (``add`` once with all vectors,
``search(query (E,), k) -> (indices, scores)``, ``len``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

# Ray Serve routes the "ray.serve" logger to the replica log.
logger = logging.getLogger("ray.serve")


class GalleryIndex(Protocol):
    """What the router needs from an index (exact or approximate)."""

    def add(self, vectors: np.ndarray) -> None: ...

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def __len__(self) -> int: ...


class ExactCosineIndex:
    """Brute-force cosine top-k over L2-normalized float32 vectors (numpy)."""

    def __init__(self) -> None:
        self._vectors = np.zeros((0, 0), dtype=np.float32)

    def add(self, vectors: np.ndarray) -> None:
        """Adds (N, E) vectors; they are L2-normalized here (zero rows stay zero)."""
        v = np.asarray(vectors, dtype=np.float32)
        if v.ndim != 2:
            raise ValueError(f"vectors must be (N, E), got {v.shape}")
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        self._vectors = v if self._vectors.size == 0 else np.concatenate([self._vectors, v])

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by cosine similarity.

        Args:
            query: (E,) query vector (any norm).
            k: Results wanted (clipped to the index size).

        Returns:
            ``(indices (k,), scores (k,))`` sorted by descending score; ties broken by the
            lower index, so results are deterministic.
        """
        n = len(self)
        if n == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        if q.shape[0] != self._vectors.shape[1]:
            raise ValueError(f"query has {q.shape[0]} dims, index has {self._vectors.shape[1]}")
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        scores = self._vectors @ q  # (N,)
        k = min(k, n)
        # lexsort: primary key descending score, secondary ascending index.
        if k < n:
            cand = np.argpartition(-scores, k - 1)[:k]
            kth = scores[cand].min()
            cand = np.flatnonzero(scores >= kth)  # keep ties at the boundary
        else:
            cand = np.arange(n)
        order = np.lexsort((cand, -scores[cand]))[:k]
        idx = cand[order]
        return idx.astype(np.int64), scores[idx].astype(np.float32)

    def __len__(self) -> int:
        return int(self._vectors.shape[0])


def make_index() -> GalleryIndex:
    """The index implementation used by the router (swap here for an ANN index)."""
    return ExactCosineIndex()


@dataclass
class GalleryItems:
    """Featurized items of one modality read from a split."""

    ids: list[str] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    arrays: list[np.ndarray] = field(default_factory=list)


def read_split(
    split_dir: str | Path, modalities: list[str], max_items: int
) -> dict[str, GalleryItems]:
    """Reads the featurized items of ``modalities`` from a prepared split.

    Args:
        split_dir: ``DIR/<split>`` holding ``*.parquet`` shards (Contract 2).
        modalities: Modalities to read (those absent from the shards are skipped).
        max_items: At most this many rows (the first by id, so it is deterministic).

    Returns:
        ``{m: GalleryItems}`` for every requested modality with at least one item.

    Raises:
        FileNotFoundError: No shards in ``split_dir``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.schema import read_shard, shard_modalities

    files = sorted(Path(split_dir).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"gallery split {split_dir} has no *.parquet shards")
    table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
    table = table.sort_by("id").slice(0, max_items)
    present = [m for m in modalities if m in shard_modalities(table)]
    cols = read_shard(table, present)
    ids = cols["id"]
    labels = cols.get("label") or [None] * len(ids)
    out: dict[str, GalleryItems] = {}
    for m in present:
        items = GalleryItems()
        for i, a in enumerate(cols[m]):
            if a is None:
                continue
            items.ids.append(ids[i])
            items.labels.append(labels[i])
            items.arrays.append(a)
        if items.ids:
            out[m] = items
    return out


@dataclass
class Gallery:
    """The gallery of one target modality: index + row metadata.

    Attributes:
        segments: For an embedding-directory gallery, ``(segment (N,), start_s (N,),
            end_s (N,))`` of each record (times NaN where the item was not windowed).
    """

    modality: str
    ids: list[str]
    labels: list[str | None]
    index: GalleryIndex
    segments: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def search(self, query: np.ndarray, k: int) -> list[dict]:
        """Top-k results as ``[{"rank", "id", "label", "score", "modality"}]`` (+
        ``segment``, ``start_s``, ``end_s`` for an embedding-directory gallery)."""
        idx, scores = self.index.search(query, k)
        out = []
        for r, (i, s) in enumerate(zip(idx.tolist(), scores.tolist(), strict=True)):
            hit = {
                "rank": r + 1,
                "id": self.ids[i],
                "label": self.labels[i],
                "score": float(s),
                "modality": self.modality,
            }
            if self.segments is not None:
                seg, start, end = self.segments
                hit["segment"] = int(seg[i])
                hit["start_s"] = None if np.isnan(start[i]) else float(start[i])
                hit["end_s"] = None if np.isnan(end[i]) else float(end[i])
            out.append(hit)
        return out


def search_galleries(
    galleries: dict[str, Gallery], targets: list[str], query: np.ndarray, k: int
) -> list[dict]:
    """Top-k over several galleries (``target: any``): each gallery's top-k merged by
    score (cosine in the shared space), ties by modality order; ranks renumbered."""
    hits = [h for m in targets for h in galleries[m].search(query, k)]
    hits.sort(key=lambda h: -h["score"])
    return [{**h, "rank": r + 1} for r, h in enumerate(hits[:k])]


def _rss_bytes() -> int:
    """Resident memory of this process (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def load_embedding_galleries(
    emb_dir: str | Path, modalities: list[str] | None = None
) -> dict[str, Gallery]:
    """The galleries of an embedding directory of ``jobs.embed`` (checked by
    :func:`serve.app.check_gallery` at start-up), one per modality, with the index
    ``jobs.index`` built (exact when there is none). Logs ``gallery_loaded`` with the
    sizes, the vectors' and indexes' bytes and the process memory growth.

    Raises:
        jobs.embedding.output.EmbeddingDirError: a stale index, an empty directory.
    """
    from jobs.embedding.index import HnswIndex, read_index_info
    from jobs.embedding.output import EmbeddingDirError, read_embeddings

    t0, rss0 = time.perf_counter(), _rss_bytes()
    info = read_index_info(emb_dir) or {"modalities": {}}
    records, _ = read_embeddings(emb_dir, vectors=False)
    present = sorted(set(records.column("modality").to_pylist()))
    mods = [m for m in (modalities or present) if m in present]
    if not mods:
        raise EmbeddingDirError(f"{emb_dir} holds none of the gallery modalities {modalities}")
    del records
    galleries: dict[str, Gallery] = {}
    nbytes: dict[str, int] = {}
    kinds: dict[str, str] = {}
    for m in mods:
        entry = info["modalities"].get(m, {"kind": "exact"})
        kinds[m] = entry["kind"]
        if entry["kind"] == "hnsw":
            meta, _ = read_embeddings(emb_dir, m, vectors=False)
            path = Path(emb_dir) / "index" / entry["file"]
            index: Any = HnswIndex.load(path, entry["params"]["ef_search"])
            nbytes[m] = path.stat().st_size
        else:
            meta, vec = read_embeddings(emb_dir, m)
            index = ExactCosineIndex()
            index.add(vec)
            nbytes[m] = int(vec.nbytes)
        if len(index) != meta.num_rows:
            raise EmbeddingDirError(
                f"{emb_dir}: the {m} index has {len(index)} vectors, the parts {meta.num_rows} "
                "records: rebuild it with `python -m jobs.index`"
            )
        nan = np.nan
        galleries[m] = Gallery(
            m,
            meta.column("id").to_pylist(),
            meta.column("label").to_pylist(),
            index,
            (
                np.asarray(meta.column("segment").to_numpy(zero_copy_only=False), np.int64),
                np.asarray(meta.column("start_s").fill_null(nan).to_numpy(), np.float64),
                np.asarray(meta.column("end_s").fill_null(nan).to_numpy(), np.float64),
            ),
        )
    logger.info(
        json.dumps(
            {
                "event": "gallery_loaded",
                "embeddings_dir": str(emb_dir),
                "sizes": {m: len(g.ids) for m, g in galleries.items()},
                "index": kinds,
                "index_bytes": nbytes,
                "rss_growth_bytes": max(0, _rss_bytes() - rss0),
                "seconds": round(time.perf_counter() - t0, 2),
            }
        )
    )
    return galleries


async def build_galleries(
    split_dir: str | Path,
    targets: list[str],
    encoders: Any,
    *,
    max_items: int,
    chunk_size: int,
) -> dict[str, Gallery]:
    """Embeds a prepared split's items with the modality deployments and indexes them.

    Args:
        split_dir: ``DIR/<split>`` with Parquet shards.
        targets: Modalities to index (those absent from the split are skipped).
        encoders: ``{modality: DeploymentHandle}`` (each has ``embed_featurized``).
        max_items: Cap on indexed rows.
        chunk_size: Items per embedding call.

    Returns:
        ``{modality: Gallery}`` for every target present in the split.
    """
    t0 = time.perf_counter()
    items = await asyncio.to_thread(read_split, split_dir, targets, max_items)
    galleries: dict[str, Gallery] = {}
    for m, it in items.items():
        embeds: list[np.ndarray] = []
        for i in range(0, len(it.arrays), chunk_size):
            embeds.extend(await encoders[m].embed_featurized.remote(it.arrays[i : i + chunk_size]))
        index = make_index()
        index.add(np.stack(embeds))
        galleries[m] = Gallery(m, it.ids, it.labels, index)
    logger.info(
        json.dumps(
            {
                "event": "gallery_built",
                "split_dir": str(split_dir),
                "sizes": {m: len(g.ids) for m, g in galleries.items()},
                "seconds": round(time.perf_counter() - t0, 2),
            }
        )
    )
    return galleries
