"""Shard reading for training: Ray Data on the driver, per-rank batching in the workers.

The driver builds one ``ray.data.Dataset`` per split with ``read_parquet`` and hands it to
``TorchTrainer(datasets=...)``; Ray Train splits it across ranks with
``streaming_split(equal=True)``, so every rank sees the same number of rows. Each worker
turns its rows into model batches with ``pipelines.schema.unpack_table`` +
``models.data.collate``, always collating *every* modality of the stage (absent rows get
``<m>_present = False``) so that every rank runs the same modules in the same order, which
ZeRO-3 requires (a branch skipped on one rank deadlocks its parameter all-gathers).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.schema import MODALITIES, unpack_column, unpack_table


def resolve_path(path: str) -> str:
    """Relative local paths are taken from the CWD (the job's working dir); URIs are kept."""
    if "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def join_path(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts]) if "://" in base else os.path.join(base, *parts)


@dataclass
class ShardInfo:
    """What the driver learns from the shards before training.

    Attributes:
        modalities: Modalities with at least one non-null row in the train split.
        label_names: Sorted distinct labels of the train split (class index order).
        num_rows: Rows per split.
        pair_rows: Train rows holding both modalities of a pair, for every pair that has
            any, keyed ``(a, b)`` in canonical modality order.
        label_counts: Train rows per label (of ``label_names``).
    """

    modalities: list[str]
    label_names: list[str]
    num_rows: dict[str, int]
    pair_rows: dict[tuple[str, str], int] = field(default_factory=dict)
    label_counts: dict[str, int] = field(default_factory=dict)

    def rows_with_pair(self, a: str, b: str) -> int:
        """Train rows that hold both ``a`` and ``b`` (either order)."""
        return self.pair_rows.get((a, b), self.pair_rows.get((b, a), 0))


def inspect_shards(shards_dir: str) -> ShardInfo:
    """Reads only the light columns of the shards to find modalities and labels.

    Raises:
        FileNotFoundError: When ``shards_dir/train`` holds no Parquet file.
    """
    num_rows: dict[str, int] = {}
    train: pa.Table | None = None
    for split in ("train", "val", "test"):
        path = join_path(shards_dir, split)
        try:
            ds = pq.ParquetDataset(path)
        except (FileNotFoundError, OSError, pa.ArrowInvalid) as e:
            if split == "train":
                raise FileNotFoundError(
                    f"no training shards under {path!r}: run `python -m jobs.prepare` first ({e})"
                ) from e
            continue
        cols = [c for c in ("label", "modalities") if c in ds.schema.names]
        table = ds.read(columns=cols)
        num_rows[split] = table.num_rows
        if split == "train":
            train = table
    assert train is not None
    if train.num_rows == 0:
        raise FileNotFoundError(f"training shards under {shards_dir!r} hold no rows")
    mods_col = train.column("modalities")
    present = set(pc.unique(pc.list_flatten(mods_col)).to_pylist())
    modalities = [m for m in MODALITIES if m in present]
    counts = {}
    if "label" in train.column_names:
        vc = pc.value_counts(train.column("label")).to_pylist()
        counts = {d["values"]: int(d["counts"]) for d in vc if d["values"] not in (None, "")}
    return ShardInfo(
        modalities=modalities,
        label_names=sorted(counts, key=_label_key),
        num_rows=num_rows,
        pair_rows=_pair_rows(mods_col, modalities, train.num_rows),
        label_counts=counts,
    )


def _pair_rows(
    mods_col: pa.ChunkedArray, modalities: list[str], n_rows: int
) -> dict[tuple[str, str], int]:
    """Rows holding both modalities of each pair, from the ``modalities`` list column."""
    flat = pc.list_flatten(mods_col).to_numpy(zero_copy_only=False)
    parent = pc.list_parent_indices(mods_col).to_numpy()
    has = np.zeros((n_rows, len(modalities)), dtype=np.int64)  # (N, M) row holds modality
    for j, m in enumerate(modalities):
        has[parent[flat == m], j] = 1
    both = has.T @ has  # (M, M) rows holding both
    return {
        (a, b): int(both[i, j])
        for i, a in enumerate(modalities)
        for j, b in enumerate(modalities)
        if i < j and both[i, j] > 0
    }


def _label_key(x: str) -> tuple[int, Any]:
    # Numeric labels ("0".."9") in numeric order, others alphabetically after them.
    try:
        return (0, float(x))
    except ValueError:
        return (1, x)


def table_to_samples(table: pa.Table, modalities: list[str]) -> list[dict[str, Any]]:
    """A shard table -> one dict per row: modality -> ndarray | None, plus ``label``/``id``."""
    cols = unpack_table(table, [m for m in modalities if m in table.column_names])
    n = table.num_rows
    # Cached frozen-tower features (jobs.tower_cache), read instead of running the tower.
    cached = {}
    for m in modalities:
        key = f"{m}__tower"
        if key in table.column_names:
            cached[key] = unpack_column(
                m, table.column(key), table.column(f"{key}_shape"), "float16"
            )
    samples = []
    for i in range(n):
        s: dict[str, Any] = {m: (cols[m][i] if m in cols else None) for m in modalities}
        for key, vals in cached.items():
            s[key] = vals[i]
        s["label"] = cols.get("label", [None] * n)[i]
        s["id"] = cols.get("id", [None] * n)[i]
        samples.append(s)
    return samples


def balanced_order(labels: list[Any], rng: np.random.Generator) -> np.ndarray:
    """``len(labels)`` row indices drawn with replacement, row ``i`` with probability
    proportional to ``1 / n[labels[i]]``: every class is drawn about equally often.
    Unlabelled rows (None/"") weigh as the mean labelled row."""
    n = len(labels)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    keys = [None if lab in (None, "") else lab for lab in labels]
    counts: dict[Any, int] = {}
    for k in keys:
        if k is not None:
            counts[k] = counts.get(k, 0) + 1
    w = np.array([0.0 if k is None else 1.0 / counts[k] for k in keys])
    labelled = w > 0
    w[~labelled] = w[labelled].mean() if labelled.any() else 1.0
    return rng.choice(n, size=n, replace=True, p=w / w.sum())


class RankBatches:
    """Epoch iterator over one rank's rows, as lists of sample dicts (micro-batches).

    With ``cache=True`` the rank streams its Ray Data split once, keeps the rows, and every
    epoch (including the first) is a seeded permutation of them, so a data position
    ``(epoch, batch)`` is reproducible after a restart. Without cache each epoch streams again
    (``local_shuffle_buffer_size`` shuffling) and a resume skips the consumed batches.

    Args:
        data_iter: ``ray.train.get_dataset_shard("train")`` (or anything with ``iter_batches``).
        modalities: Modalities to unpack.
        batch_size: Micro-batch size; incomplete batches are dropped (equal across ranks).
        cache: See above.
        shuffle: Shuffle every epoch.
        seed: Base seed; epoch ``e`` of rank ``r`` uses ``seed + 1000 * e + r``.
        rank: This worker's rank.
        sampling: ``uniform`` (every cached row once an epoch) or ``balanced`` (as many
            rows, drawn with replacement with probability ``1 / n_c`` of the row's label
            among this rank's rows: :func:`balanced_order`); needs ``cache``.
    """

    def __init__(
        self,
        data_iter: Any,
        *,
        modalities: list[str],
        batch_size: int,
        cache: bool,
        shuffle: bool,
        seed: int,
        rank: int,
        sampling: str = "uniform",
    ) -> None:
        if sampling not in ("uniform", "balanced"):
            raise ValueError(f"sampling must be uniform|balanced, got {sampling!r}")
        if sampling == "balanced" and not cache:
            raise ValueError("sampling=balanced needs cache=True (data.cache)")
        self.sampling = sampling
        self.data_iter = data_iter
        self.modalities = modalities
        self.batch_size = batch_size
        self.cache = cache
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self._rows: list[dict[str, Any]] | None = None

    def _stream(self) -> Iterator[list[dict[str, Any]]]:
        kwargs: dict[str, Any] = dict(
            batch_size=self.batch_size, batch_format="pyarrow", drop_last=True
        )
        if self.shuffle and not self.cache:
            kwargs["local_shuffle_buffer_size"] = 4 * self.batch_size
        for table in self.data_iter.iter_batches(**kwargs):
            yield table_to_samples(table, self.modalities)

    def _fill_cache(self) -> list[dict[str, Any]]:
        if self._rows is None:
            rows: list[dict[str, Any]] = []
            # drop_last=False here: the cache keeps every row, batching drops the tail later.
            for table in self.data_iter.iter_batches(
                batch_size=256, batch_format="pyarrow", drop_last=False
            ):
                rows.extend(table_to_samples(table, self.modalities))
            self._rows = rows
        return self._rows

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[list[dict[str, Any]]]:
        """Yields the micro-batches of ``epoch``, skipping the first ``skip`` of them."""
        if not self.cache:
            for i, batch in enumerate(self._stream()):
                if i >= skip:
                    yield batch
            return
        rows = self._fill_cache()
        rng = np.random.default_rng(self.seed + 1000 * epoch + self.rank)
        if self.sampling == "balanced":
            order = balanced_order([r.get("label") for r in rows], rng)
        else:
            order = np.arange(len(rows))
            if self.shuffle:
                rng.shuffle(order)
        n_batches = len(rows) // self.batch_size
        for b in range(skip, n_batches):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield [rows[i] for i in idx]
