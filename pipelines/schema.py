"""Contract 2: the Parquet shard schema, and the one place shards are packed, written and read.

Each modality ``m`` of the modality table (:mod:`common.modalities`) has two columns:

* ``m``: ``large_binary``: the featurized tensor's raw bytes in C order, in the record's
  dtype (native little-endian; null where the row lacks the modality);
* ``m_shape``: ``list<int32>`` with the tensor's shape (null where absent).

This keeps shards readable by plain pyarrow/pandas and by ``ray.data.read_parquet``
without extension types (``np.frombuffer(value, dtype).reshape(shape)``), supports nulls
and variable shapes (text length, audio frames), and round-trips exactly. One Parquet
BYTE_ARRAY value per tensor: the earlier flat ``list<dtype>`` column cost a repetition and
a definition level per ELEMENT (and widened uint8 to INT32): writing 224-px images was
~30x slower and reading ~50x slower than the bytes (benchmarks/prepare_throughput.py).
Shards written with ``list<dtype>`` columns still read (:func:`unpack_column` takes both;
:func:`to_shard_table` converts them). :func:`write_shard` / :func:`read_shard` are the one writer and
reader (prepare, synthetic shards, serve devtools, benchmarks, tests);
:func:`pack_tensors` / :func:`unpack_column` / :func:`unpack_table` are their column-level
parts (Ray Data batches use :func:`unpack_table` directly).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from common.modalities import MODALITIES, get_modality, modality_names

#: The split names, in order.
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Non-tensor columns of every shard.
META_COLUMNS: tuple[str, ...] = ("id", "label", "group", "modalities")

__all__ = [
    "MODALITIES",
    "META_COLUMNS",
    "SPLITS",
    "TENSOR_TYPE",
    "arrow_type",
    "list_to_tensor_column",
    "modality_dtype",
    "pack_tensors",
    "read_shard",
    "shard_modalities",
    "shard_schema",
    "to_shard_table",
    "unpack_column",
    "unpack_table",
    "write_shard",
]


def modality_dtype(modality: str) -> np.dtype:
    """numpy dtype of ``modality``'s featurized tensors (from its record)."""
    return get_modality(modality).np_dtype


#: Arrow type of every tensor column (raw C-order bytes; ``m_shape`` and the record's
#: dtype make the tensor).
TENSOR_TYPE: pa.DataType = pa.large_binary()


def arrow_type(modality: str, dtype: Any = None) -> pa.DataType:
    """The Arrow type of a modality's tensor column: :data:`TENSOR_TYPE` (the dtype is the
    record's, or ``dtype`` for a pipeline's stage-1 form; it is not in the type)."""
    return TENSOR_TYPE


def is_tensor_list(t: pa.DataType) -> bool:
    """True for the older ``list<dtype>`` tensor columns (still read)."""
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def list_to_tensor_column(
    modality: str, data: pa.Array | pa.ChunkedArray, dtype: Any = None
) -> pa.Array:
    """An older flat ``list<dtype>`` tensor column -> :data:`TENSOR_TYPE`, its values cast to
    the record's dtype (or ``dtype``)."""
    if isinstance(data, pa.ChunkedArray):
        data = data.combine_chunks()
    if not is_tensor_list(data.type):
        return data
    dtype = np.dtype(dtype or modality_dtype(modality)).newbyteorder("<")
    nulls = data.is_null().to_numpy(zero_copy_only=False)
    if len(data) == 0:
        return pa.array([], TENSOR_TYPE)
    offsets = data.offsets.to_numpy().astype(np.int64)
    values = data.values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return _binary_array(
        np.ascontiguousarray(values).view(np.uint8), offsets * dtype.itemsize, nulls
    )


def _binary_array(flat: np.ndarray, offsets: np.ndarray, nulls: np.ndarray) -> pa.Array:
    """``large_binary`` array over uint8 ``flat`` with int64 byte ``offsets`` (n + 1), no copy
    of ``flat``."""
    n = len(nulls)
    validity = None
    if nulls.any():
        validity = pa.array(~nulls, type=pa.bool_()).buffers()[1]
    return pa.Array.from_buffers(
        TENSOR_TYPE,
        n,
        [validity, pa.py_buffer(np.ascontiguousarray(offsets, dtype=np.int64)), pa.py_buffer(flat)],
        null_count=int(nulls.sum()),
    )


def shard_schema(modalities: Sequence[str] | None = None) -> pa.Schema:
    """The Arrow schema of a shard holding ``modalities`` columns (default: the table)."""
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("group", pa.string()),
        pa.field("modalities", pa.list_(pa.string())),
    ]
    for m in modality_names() if modalities is None else modalities:
        fields.append(pa.field(m, arrow_type(m)))
        fields.append(pa.field(f"{m}_shape", pa.list_(pa.int32())))
    return pa.schema(fields)


def shard_modalities(table: pa.Table | pa.Schema) -> list[str]:
    """The declared modalities that have a tensor column in ``table``, in table order."""
    names = set(table.names if isinstance(table, pa.Schema) else table.column_names)
    return [m for m in modality_names() if m in names and f"{m}_shape" in names]


def pack_tensors(
    modality: str, tensors: Sequence[np.ndarray | None], dtype: Any = None
) -> tuple[pa.Array, pa.Array]:
    """Packs per-row tensors (or None) into the ``(m, m_shape)`` column pair.

    Args:
        modality: Its record gives the dtype.
        tensors: One array (any shape) or ``None`` per row.
        dtype: Another dtype (the pipeline's stage-1 form of a fitted featurizer).
    """
    dtype = np.dtype(dtype or modality_dtype(modality)).newbyteorder("<")
    offsets = np.zeros(len(tensors) + 1, dtype=np.int64)
    shapes: list[list[int] | None] = []
    chunks: list[np.ndarray] = []
    nulls = np.zeros(len(tensors), dtype=bool)
    for i, t in enumerate(tensors):
        if t is None:
            offsets[i + 1] = offsets[i]
            shapes.append(None)
            nulls[i] = True
            continue
        t = np.ascontiguousarray(t, dtype=dtype)
        chunks.append(t.reshape(-1).view(np.uint8))
        offsets[i + 1] = offsets[i] + t.nbytes
        shapes.append([int(s) for s in t.shape])
    flat = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint8)
    return _binary_array(flat, offsets, nulls), pa.array(shapes, type=pa.list_(pa.int32()))


def unpack_column(
    modality: str,
    data: pa.Array | pa.ChunkedArray,
    shape: pa.Array | pa.ChunkedArray,
    dtype: Any = None,
) -> list[np.ndarray | None]:
    """Inverse of :func:`pack_tensors`: one ndarray (or None) per row (writable copies).

    Takes :data:`TENSOR_TYPE` (or ``binary``) columns and the older ``list<dtype>`` ones."""
    if isinstance(data, pa.ChunkedArray):
        data = data.combine_chunks()
    if isinstance(shape, pa.ChunkedArray):
        shape = shape.combine_chunks()
    dtype = np.dtype(dtype or modality_dtype(modality))
    shapes = shape.to_pylist()
    if len(data) == 0:
        return []
    if not is_tensor_list(data.type):
        if not (pa.types.is_large_binary(data.type) or pa.types.is_binary(data.type)):
            raise TypeError(f"{modality} tensor column has type {data.type}, want {TENSOR_TYPE}")
        return _unpack_binary(data, shapes, dtype.newbyteorder("<"))
    offsets = data.offsets.to_numpy()
    # ``values`` ignores the array's own slice offset; offsets are absolute into it.
    values = data.values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    nulls = data.is_null().to_numpy(zero_copy_only=False)
    out: list[np.ndarray | None] = []
    for i in range(len(data)):
        if nulls[i]:
            out.append(None)
            continue
        flat = values[offsets[i] : offsets[i + 1]]
        out.append(flat.reshape(shapes[i]).copy())
    return out


def _unpack_binary(data: pa.Array, shapes: list, dtype: np.dtype) -> list[np.ndarray | None]:
    # Offsets are absolute into the data buffer (a sliced array keeps its parent's).
    buf = data.buffers()[2]
    raw = np.frombuffer(buf, dtype=np.uint8) if buf is not None else np.zeros(0, np.uint8)
    otype = np.int64 if pa.types.is_large_binary(data.type) else np.int32
    offsets = np.frombuffer(data.buffers()[1], dtype=otype)[
        data.offset : data.offset + len(data) + 1
    ]
    nulls = data.is_null().to_numpy(zero_copy_only=False)
    out: list[np.ndarray | None] = []
    for i in range(len(data)):
        if nulls[i]:
            out.append(None)
            continue
        b = raw[offsets[i] : offsets[i + 1]]
        # One copy: aligned, writable, native byte order.
        out.append(b.view(dtype).astype(dtype.newbyteorder("="), copy=True).reshape(shapes[i]))
    return out


def unpack_table(table: pa.Table, modalities: Sequence[str] | None = None) -> dict[str, list]:
    """Reads a shard table (or Ray Data pyarrow batch) into python lists/ndarrays.

    Returns:
        ``{"id", "label", "group", "modalities": list, m: list[ndarray | None]}`` for each
        of ``modalities`` (default: every declared modality the table has).
    """
    cols = {c: table.column(c).to_pylist() for c in META_COLUMNS if c in table.column_names}
    for m in shard_modalities(table) if modalities is None else modalities:
        cols[m] = unpack_column(m, table.column(m), table.column(f"{m}_shape"))
    return cols


def to_shard_table(
    rows_or_columns: pa.Table | Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]],
    modalities: Sequence[str] | None = None,
) -> pa.Table:
    """Rows (dicts) or columns (``{name: list}``) -> a table of :func:`shard_schema`.

    Tensor values are ndarrays (any dtype castable to the record's) or ``None``; ``label``
    and ``group`` may be missing (null); ``modalities`` is derived from the non-null
    tensors when missing. A ``pa.Table`` is cast to the schema.

    Args:
        rows_or_columns: The rows.
        modalities: Tensor columns of the shard (default: every declared modality).
    """
    mods = list(modality_names() if modalities is None else modalities)
    schema = shard_schema(mods)
    if isinstance(rows_or_columns, pa.Table):
        t = rows_or_columns
        for m in mods:
            if m in t.column_names and is_tensor_list(t.schema.field(m).type):
                i = t.column_names.index(m)
                t = t.set_column(i, m, list_to_tensor_column(m, t.column(m)))
            if m not in t.column_names:
                t = t.append_column(m, pa.nulls(t.num_rows, arrow_type(m)))
                t = t.append_column(f"{m}_shape", pa.nulls(t.num_rows, pa.list_(pa.int32())))
        return t.select(schema.names).cast(schema)
    if isinstance(rows_or_columns, Mapping):
        cols = {k: list(v) for k, v in rows_or_columns.items()}
    else:
        rows = list(rows_or_columns)
        keys = {k for r in rows for k in r}
        cols = {k: [r.get(k) for r in rows] for k in keys}
    n = len(cols["id"])
    unknown = sorted(set(cols) - set(META_COLUMNS) - set(mods))
    if unknown:
        raise ValueError(f"shard columns {unknown} are neither meta columns nor in {mods}")
    if "modalities" not in cols:
        cols["modalities"] = [
            [m for m in mods if cols.get(m) is not None and cols[m][i] is not None]
            for i in range(n)
        ]
    arrays: list[pa.Array] = [
        pa.array([None if v is None else str(v) for v in cols.get(c, [None] * n)], pa.string())
        for c in ("id", "label", "group")
    ]
    arrays.append(pa.array(cols["modalities"], pa.list_(pa.string())))
    for m in mods:
        arrays += list(pack_tensors(m, cols.get(m, [None] * n)))
    return pa.Table.from_arrays(arrays, schema=schema)


def write_shard(
    path: str | Path,
    rows_or_columns: pa.Table | Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]],
    modalities: Sequence[str] | None = None,
    *,
    filesystem: pafs.FileSystem | None = None,
    sort: bool = True,
) -> pa.Table:
    """Writes one Parquet shard (tensor columns snappy, the rest zstd; dictionaries and
    statistics on meta columns only).

    Args:
        path: File path (local, or inside ``filesystem``); parent folders are created.
        rows_or_columns: See :func:`to_shard_table`.
        modalities: Tensor columns (default: every declared modality).
        filesystem: A pyarrow filesystem (default: local).
        sort: Sort rows by id, so the bytes do not depend on the input order.

    Returns:
        The written table.
    """
    import pyarrow.compute as pc

    table = to_shard_table(rows_or_columns, modalities)
    if sort and table.num_rows:
        order = pc.sort_indices(table, sort_keys=[("id", "ascending")])
        # Already in id order (e.g. a manifest's order): no take, which copies every tensor.
        if not np.array_equal(order.to_numpy(), np.arange(table.num_rows)):
            table = table.take(order)
    fs = filesystem or pafs.LocalFileSystem()
    path = str(path)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.create_dir(parent, recursive=True)
    meta = list(META_COLUMNS)
    tensors = set(shard_modalities(table))
    pq.write_table(
        table,
        path,
        filesystem=fs,
        # Tensor bytes: snappy (224-px JPEG-sourced pixels, 256 rows: 0.25 ms a row to
        # write vs 1.7 with zstd, files 11% larger; reads 2x faster); the rest zstd.
        compression={c: "snappy" if c in tensors else "zstd" for c in table.column_names},
        row_group_size=1024,
        # Dictionaries and min/max statistics are useless on tensor payloads and cost
        # ~5x the write time; keep them for the small metadata columns only.
        use_dictionary=meta,
        write_statistics=meta,
    )
    return table


def read_shard(
    path_or_table: str | Path | pa.Table, modalities: Sequence[str] | None = None
) -> dict[str, list]:
    """Reads one shard (a Parquet path or an already read table) -> :func:`unpack_table`."""
    if isinstance(path_or_table, pa.Table):
        table = path_or_table
    else:
        cols = None
        if modalities is not None:
            cols = list(META_COLUMNS) + [c for m in modalities for c in (m, f"{m}_shape")]
        table = pq.read_table(str(path_or_table), columns=cols)
    return unpack_table(table, modalities)
