"""Stage 2's last step: rows routed to their ``(split, shard)`` and written, one file each.

:func:`route_block` splits one finalized block by ``(_split, _shard)``; :func:`write_group`
concatenates one group's pieces and writes them with :func:`write_split_shard`, sorted by
id under a deterministic name (:func:`shard_name`); :func:`shard_of` is a row's shard.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from pipelines.dedupe import content_hash
from pipelines.schema import write_shard as write_shard_file

__all__ = ["route_block", "shard_name", "shard_of", "write_group", "write_split_shard"]


def shard_of(row_id: str, num_shards: int) -> int:
    """Deterministic shard index of a row id."""
    if num_shards <= 1:
        return 0
    return int(content_hash(row_id)[:8], 16) % num_shards


def shard_name(split: str, shard: int, num_shards: int) -> str:
    return f"{split}-{shard:05d}-of-{num_shards:05d}.parquet"


def write_split_shard(group: pa.Table, out: str, num_shards: dict[str, int]) -> pa.Table:
    """Writes one (split, shard) group as one Parquet file (:func:`pipelines.schema.write_shard`).

    Rows are sorted by id, so the bytes do not depend on the order the exchange delivered
    them in; the file name is ``<split>/<split>-<shard>-of-<n>.parquet``.

    Args:
        group: All rows of one ``(_split, _shard)`` group.
        out: Output root (local dir or URI).
        num_shards: ``{split: n}`` (for file names).

    Returns:
        One row: ``split``, ``shard``, ``rows``, ``file`` (relative to ``out``).
    """
    split = group.column("_split")[0].as_py()
    shard = int(group.column("_shard")[0].as_py())
    table = group.drop_columns(["_split", "_shard"])
    if "://" in out:
        fs, base = pafs.FileSystem.from_uri(out)
    else:
        fs, base = pafs.LocalFileSystem(), out
    name = shard_name(split, shard, num_shards[split])
    written = write_shard_file(f"{base.rstrip('/')}/{split}/{name}", table, filesystem=fs)
    return pa.table(
        {
            "split": [split],
            "shard": [shard],
            "rows": [written.num_rows],
            "file": [f"{split}/{name}"],
        }
    )


def route_block(block: pa.Table, groups: list[tuple[str, int]]) -> tuple[pa.Table, ...]:
    """Splits one block by ``(_split, _shard)`` into one table per group (in ``groups``
    order; empty where the block holds none of a group)."""
    index = {g: i for i, g in enumerate(groups)}
    keys = zip(block.column("_split").to_pylist(), block.column("_shard").to_pylist(), strict=True)
    gid = np.fromiter((index[(s, int(k))] for s, k in keys), dtype=np.int64, count=block.num_rows)
    if len(groups) == 1:
        return block
    order = np.argsort(gid, kind="stable")
    bounds = np.cumsum(np.bincount(gid, minlength=len(groups)))
    # One take in group order (none when the block is in that order already), then
    # zero-copy slices: each row's tensor bytes are copied at most once here.
    if not np.array_equal(order, np.arange(len(order))):
        block = block.take(pa.array(order))
    starts = np.concatenate([[0], bounds[:-1]])
    return tuple(block.slice(int(a), int(b - a)) for a, b in zip(starts, bounds, strict=True))


def write_group(out: str, num_shards: dict[str, int], *pieces: pa.Table) -> pa.Table:
    """Concatenates one group's pieces and writes them as its shard (no file if empty)."""
    rows = [p for p in pieces if p.num_rows]
    if not rows:
        return pa.table({"split": [], "shard": [], "rows": [], "file": []})
    return write_split_shard(pa.concat_tables(rows, promote_options="default"), out, num_shards)
