"""Synthetic prepared shards (Contract 2) with a learnable label signal, for tests/benchmarks.

Every item is a real featurized example: each featurizer's ``example(rng, label)`` (a small
file or inline value whose content depends on the label) goes through the same two stages as
``jobs.prepare`` (``decode``; a tokenizer trained on the decoded items of a ``tokenized``
featurizer; ``fit`` statistics; ``finalize``). Rows randomly miss some modalities (the
variable-subset case). Shapes and sizes are the featurizers' (``features`` config), and the
shards directory carries the ``data_config.yaml`` (and ``tokenizer/``) a prepared one does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from common.config import to_dict
from common.modalities import modality_names
from pipelines.config import FeatureConfig
from pipelines.featurize import FEATURIZERS, get_featurizer
from pipelines.schema import pack_tensors, shard_schema
from pipelines.tokenizer import TOKENIZER_DIR, train_tokenizer

#: Distinct examples featurized per (modality, label); rows draw among them.
VARIANTS = 2


def _featurized_examples(
    modalities: Sequence[str], n_classes: int, fc: FeatureConfig, out_dir: str, seed: int
) -> tuple[dict[str, list[list[np.ndarray]]], FeatureConfig]:
    """``{m: [label][variant] -> featurized item]}`` and the fitted feature config."""
    rng = np.random.default_rng(seed)
    decoded: dict[str, list[list[object]]] = {}
    for m in modalities:
        f = get_featurizer(m, fc)
        decoded[m] = [
            [f.decode(*f.example(rng, label=y)) for _ in range(VARIANTS)] for y in range(n_classes)
        ]
    tok_dir = os.path.join(out_dir, TOKENIZER_DIR)
    updates: dict[str, dict] = {}
    for m in modalities:
        flat = [x for row in decoded[m] for x in row]
        if FEATURIZERS[m].tokenized:
            vocab = int(fc.section(m).vocab_size)
            train_tokenizer([str(x) for x in flat], tok_dir, vocab_size=vocab)
        fitted = get_featurizer(m, fc).fit(flat)
        if fitted:
            updates[m] = fitted
    if updates:
        fc = fc.with_overrides(updates)
    out: dict[str, list[list[np.ndarray]]] = {}
    for m in modalities:
        f = get_featurizer(m, fc, assets_dir=out_dir)
        out[m] = [[f.finalize(x) for x in row] for row in decoded[m]]
    return out, fc


def write_synthetic_shards(
    out_dir: str,
    *,
    n: int = 96,
    modalities: Sequence[str] | None = None,
    n_classes: int = 10,
    drop_prob: float = 0.15,
    seed: int = 0,
    splits: dict[str, float] | None = None,
    features: FeatureConfig | None = None,
) -> str:
    """Writes ``out_dir/{train,val,test}/part-0.parquet``, ``data_config.yaml`` and, for a
    tokenized modality, ``tokenizer/``.

    Args:
        out_dir: Destination dir.
        n: Rows in total.
        modalities: Modalities to generate (default: every declared modality with a
            featurizer; each row keeps at least one).
        n_classes: Labels ``"0"..``.
        drop_prob: Probability that a row lacks a given modality.
        seed: RNG seed (the same seed gives the same bytes).
        splits: Fractions per split (default 0.8/0.1/0.1).
        features: Feature config (default: the featurizers' defaults).

    Returns:
        ``out_dir``.
    """
    mods = list(modalities or [m for m in modality_names() if m in FEATURIZERS])
    os.makedirs(out_dir, exist_ok=True)
    examples, fc = _featurized_examples(mods, n_classes, features or FeatureConfig(), out_dir, 1234)
    rng = np.random.default_rng(seed)
    splits = splits or {"train": 0.8, "val": 0.1, "test": 0.1}
    bounds = np.cumsum([0] + [int(round(f * n)) for f in splits.values()])
    bounds[-1] = n
    rows = []
    for i in range(n):
        y = i % n_classes
        keep = [m for m in mods if rng.random() >= drop_prob] or [mods[0]]
        items = {m: examples[m][y][int(rng.integers(VARIANTS))] for m in keep}
        rows.append((f"s-{i:05d}", str(y), items))
    for k, split in enumerate(splits):
        part = rows[bounds[k] : bounds[k + 1]]
        cols: dict[str, pa.Array] = {
            "id": pa.array([r[0] for r in part]),
            "label": pa.array([r[1] for r in part]),
            "group": pa.array([f"g{j % 7}" for j in range(len(part))]),
            "modalities": pa.array([[m for m in mods if m in r[2]] for r in part]),
        }
        for m in mods:
            data, shape = pack_tensors(m, [r[2].get(m) for r in part])
            cols[m], cols[f"{m}_shape"] = data, shape
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
        pq.write_table(
            pa.table(cols, schema=shard_schema(mods)),
            os.path.join(out_dir, split, "part-0.parquet"),
        )
    with open(os.path.join(out_dir, "data_config.yaml"), "w") as f:
        yaml.safe_dump({"features": to_dict(fc)}, f, sort_keys=False)
    with open(os.path.join(out_dir, "stats.json"), "w") as f:
        json.dump(
            {
                "rows_written": {s: int(bounds[k + 1] - bounds[k]) for k, s in enumerate(splits)},
                "synthetic": True,
            },
            f,
        )
    return out_dir
