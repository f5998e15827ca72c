"""Contract 2: the Parquet shard schema, and the one place tensors are packed/unpacked.

Each modality ``m`` has two columns:

* ``m``: a flat ``list<dtype>`` holding the featurized tensor in C order (null where the
  row lacks the modality);
* ``m_shape``: ``list<int32>`` with the tensor's shape (null where absent).

This keeps shards readable by plain pyarrow/pandas and by ``ray.data.read_parquet``
without extension types, supports nulls and variable shapes (text length, audio frames),
and round-trips exactly. Pipelines write with :func:`pack_tensors`; training, evaluation
and serving read with :func:`unpack_column`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

MODALITIES: tuple[str, ...] = ("text", "image", "audio", "video", "pointcloud", "signal")

#: numpy dtype of each modality's featurized tensor (Contract 2 / DESIGN modality table).
MODALITY_DTYPES: dict[str, np.dtype] = {
    "text": np.dtype(np.int32),
    "image": np.dtype(np.uint8),
    "audio": np.dtype(np.float16),
    "video": np.dtype(np.uint8),
    "pointcloud": np.dtype(np.float16),
    "signal": np.dtype(np.float16),
}

SPLITS: tuple[str, ...] = ("train", "val", "test")


def arrow_type(modality: str) -> pa.DataType:
    return pa.list_(pa.from_numpy_dtype(MODALITY_DTYPES[modality]))


def shard_schema(modalities: Sequence[str] = MODALITIES) -> pa.Schema:
    """The Arrow schema of a shard holding ``modalities`` columns."""
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("group", pa.string()),
        pa.field("modalities", pa.list_(pa.string())),
    ]
    for m in modalities:
        fields.append(pa.field(m, arrow_type(m)))
        fields.append(pa.field(f"{m}_shape", pa.list_(pa.int32())))
    return pa.schema(fields)


def pack_tensors(modality: str, tensors: Sequence[np.ndarray | None]) -> tuple[pa.Array, pa.Array]:
    """Packs per-row tensors (or None) into the ``(m, m_shape)`` column pair."""
    dtype = MODALITY_DTYPES[modality]
    offsets = [0]
    shapes: list[list[int] | None] = []
    chunks: list[np.ndarray] = []
    valid: list[bool] = []
    for t in tensors:
        if t is None:
            offsets.append(offsets[-1])
            shapes.append(None)
            valid.append(False)
            continue
        t = np.ascontiguousarray(t, dtype=dtype)
        chunks.append(t.reshape(-1))
        offsets.append(offsets[-1] + t.size)
        shapes.append([int(s) for s in t.shape])
        valid.append(True)
    flat = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
    mask = pa.array([not v for v in valid], type=pa.bool_())
    data = pa.ListArray.from_arrays(
        pa.array(np.asarray(offsets, dtype=np.int32)), pa.array(flat), mask=mask
    )
    return data, pa.array(shapes, type=pa.list_(pa.int32()))


def unpack_column(
    modality: str, data: pa.Array | pa.ChunkedArray, shape: pa.Array | pa.ChunkedArray
) -> list[np.ndarray | None]:
    """Inverse of :func:`pack_tensors`: one ndarray (or None) per row."""
    if isinstance(data, pa.ChunkedArray):
        data = data.combine_chunks()
    if isinstance(shape, pa.ChunkedArray):
        shape = shape.combine_chunks()
    dtype = MODALITY_DTYPES[modality]
    shapes = shape.to_pylist()
    if len(data) == 0:
        return []
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


def unpack_table(table: pa.Table, modalities: Sequence[str] | None = None) -> dict[str, list]:
    """Reads a shard table (or Ray Data pyarrow batch) into python lists/ndarrays."""
    cols = {
        c: table.column(c).to_pylist()
        for c in ("id", "label", "group", "modalities")
        if c in table.column_names
    }
    for m in modalities or [m for m in MODALITIES if m in table.column_names]:
        cols[m] = unpack_column(m, table.column(m), table.column(f"{m}_shape"))
    return cols
