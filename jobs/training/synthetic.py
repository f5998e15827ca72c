"""Synthetic prepared shards (Contract 2) with a learnable label signal, for tests/benchmarks.

Every modality of a row carries a class-dependent pattern plus noise, so losses fall and
retrieval improves within a few dozen steps; rows randomly miss some modalities (the
variable-subset case). Shapes follow INTERFACES §1 defaults.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.schema import MODALITIES, pack_tensors, shard_schema


def _class_patterns(rng: np.random.Generator, n_classes: int) -> dict[str, np.ndarray]:
    return {
        "image": rng.integers(0, 256, (n_classes, 32, 32, 3)).astype(np.float32),
        "audio": rng.standard_normal((n_classes, 1, 40)).astype(np.float32),
        "video": rng.integers(0, 256, (n_classes, 1, 32, 32, 3)).astype(np.float32),
        "pointcloud": rng.standard_normal((n_classes, 1, 3)).astype(np.float32),
        "signal": rng.standard_normal((n_classes, 3, 1)).astype(np.float32),
    }


def _sample(m: str, y: int, pat: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    if m == "text":
        return np.array([1, 10 + y, 30 + y, int(rng.integers(50, 60)), 2], dtype=np.int32)
    if m == "image":
        return np.clip(pat["image"][y] * 0.7 + rng.integers(0, 80, (32, 32, 3)), 0, 255)
    if m == "audio":
        t = int(rng.integers(40, 65))
        return pat["audio"][y] + 0.5 * rng.standard_normal((t, 40))
    if m == "video":
        return np.clip(pat["video"][y] * 0.7 + rng.integers(0, 80, (8, 32, 32, 3)), 0, 255)
    if m == "pointcloud":
        pts = rng.standard_normal((256, 3)) * 0.3 + pat["pointcloud"][y] * 0.5
        return pts / max(1e-6, np.abs(pts).max())
    if m == "signal":
        x = np.linspace(0, 2 * np.pi * (1 + y % 5), 128)[None, :]
        return np.sin(x) * pat["signal"][y] + 0.3 * rng.standard_normal((3, 128))
    raise KeyError(m)


def write_synthetic_shards(
    out_dir: str,
    *,
    n: int = 96,
    modalities: Sequence[str] = MODALITIES,
    n_classes: int = 10,
    drop_prob: float = 0.15,
    seed: int = 0,
    splits: dict[str, float] | None = None,
) -> str:
    """Writes ``out_dir/{train,val,test}/part-0.parquet`` (+ a minimal ``data_config.yaml``).

    Args:
        out_dir: Destination dir.
        n: Rows in total.
        modalities: Modalities to generate (each row keeps at least one).
        n_classes: Labels ``"0"..``.
        drop_prob: Probability that a row lacks a given modality.
        seed: RNG seed (the same seed gives the same bytes).
        splits: Fractions per split (default 0.8/0.1/0.1).

    Returns:
        ``out_dir``.
    """
    rng = np.random.default_rng(seed)
    pat = _class_patterns(np.random.default_rng(1234), n_classes)
    splits = splits or {"train": 0.8, "val": 0.1, "test": 0.1}
    bounds = np.cumsum([0] + [int(round(f * n)) for f in splits.values()])
    bounds[-1] = n
    rows = []
    for i in range(n):
        y = i % n_classes
        keep = [m for m in modalities if rng.random() >= drop_prob] or [modalities[0]]
        rows.append((f"s-{i:05d}", str(y), {m: _sample(m, y, pat, rng) for m in keep}))
    for k, split in enumerate(splits):
        part = rows[bounds[k] : bounds[k + 1]]
        cols: dict[str, pa.Array] = {
            "id": pa.array([r[0] for r in part]),
            "label": pa.array([r[1] for r in part]),
            "group": pa.array([f"g{j % 7}" for j in range(len(part))]),
            "modalities": pa.array([[m for m in MODALITIES if m in r[2]] for r in part]),
        }
        for m in MODALITIES:
            data, shape = pack_tensors(m, [r[2].get(m) for r in part])
            cols[m], cols[f"{m}_shape"] = data, shape
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
        pq.write_table(
            pa.table(cols, schema=shard_schema()), os.path.join(out_dir, split, "part-0.parquet")
        )
    with open(os.path.join(out_dir, "data_config.yaml"), "w") as f:
        f.write(
            "features:\n  text:\n    max_len: 32\n    vocab_size: 128\n  audio:\n    max_frames: 128\n"
        )
    with open(os.path.join(out_dir, "stats.json"), "w") as f:
        json.dump(
            {
                "rows_written": {s: int(bounds[k + 1] - bounds[k]) for k, s in enumerate(splits)},
                "synthetic": True,
            },
            f,
        )
    return out_dir
