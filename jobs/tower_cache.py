"""Frozen-tower features computed once: ``python -m jobs.tower_cache --shards DIR``.

For every modality whose data config sets ``features.<m>.tower`` and ``features.<m>.cache``,
a Ray Data pass (``map_batches`` with an actor class that holds the tower, CPU or GPU) adds
the column pair ``<m>__tower`` / ``<m>__tower_shape`` (float16 ``(N, h)``: the tower's last
hidden states of the valid tokens) to every shard of every split, and writes
``DIR/tower_cache.json`` with the tower revision that produced them. Training then reads
the features instead of running the frozen tower every epoch; a run whose tower revision
differs from the recorded one is refused before any worker starts
(:func:`check_cache`).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from common.towers import CACHE_FILE, CACHE_SUFFIX, TowerError, tower_revision


def tower_feature_rows(encoder: Any, items: list[np.ndarray]) -> list[np.ndarray]:
    """The frozen tower of ``encoder`` (kind ``hf``) on featurized items -> one float16
    ``(N_i, h)`` array of valid-token features per item."""
    import torch

    from models.data import collate

    m = encoder.modality
    batch = collate([{m: x} for x in items], modalities=[m])
    with torch.no_grad():
        feats, mask = encoder.run_tower(batch)
    out = []
    for i in range(len(items)):
        n = int(mask[i].sum())
        out.append(feats[i, :n].float().numpy().astype(np.float16))
    return out


class TowerFeatures:
    """Ray Data actor: holds one modality's tower (built from the shards' data config) and
    appends its features to each pyarrow batch."""

    def __init__(self, shards_dir: str, modality: str, device: str = "cpu") -> None:
        from jobs.exports import model_sizes
        from models import OmniConfig
        from models.encoders import build_encoder
        from pipelines.config import load_feature_config
        from pipelines.featurize import get_featurizer

        fc = load_feature_config(Path(shards_dir) / "data_config.yaml")
        feat = get_featurizer(modality, fc, assets_dir=shards_dir)
        cfg = OmniConfig.from_name("tiny", modalities=[modality], **model_sizes({modality: feat}))
        self.encoder = build_encoder(modality, cfg).to(device).eval()
        self.modality = modality

    def __call__(self, table: Any) -> Any:
        from pipelines.schema import pack_tensors, unpack_column

        m = self.modality
        items = unpack_column(m, table.column(m), table.column(f"{m}_shape"))
        idx = [i for i, x in enumerate(items) if x is not None]
        feats: list[np.ndarray | None] = [None] * len(items)
        for i, f in zip(
            idx,
            tower_feature_rows(self.encoder, [items[i] for i in idx]) if idx else [],
            strict=True,
        ):
            feats[i] = f
        data, shape = pack_tensors(m, feats, dtype=np.float16)
        key = f"{m}{CACHE_SUFFIX}"
        for name in (key, f"{key}_shape"):
            if name in table.column_names:
                table = table.drop_columns([name])
        return table.append_column(key, data).append_column(f"{key}_shape", shape)


def cached_modalities(shards_dir: str | Path) -> dict[str, str]:
    """``{modality: tower ref}`` of the data config's towers with ``cache: true``."""
    from pipelines.config import load_feature_config
    from pipelines.featurize import FEATURIZERS

    fc = load_feature_config(Path(shards_dir) / "data_config.yaml")
    out = {}
    for m in FEATURIZERS:
        sec = fc.section(m)
        if getattr(sec, "tower", "") and getattr(sec, "cache", False):
            out[m] = sec.tower
    return out


def build_cache(shards_dir: str | Path, *, batch_size: int = 32, concurrency: int = 1) -> dict:
    """Adds the tower feature columns to every split's shards and writes ``tower_cache.json``."""
    import ray

    from common.towers import resolve_ref

    d = Path(shards_dir)
    record: dict[str, Any] = {}
    for m, ref in cached_modalities(d).items():
        ref = resolve_ref(ref, d)  # checked here, in the driver
        for split in ("train", "val", "test"):
            src = d / split
            if not src.is_dir() or not any(src.glob("*.parquet")):
                continue
            tmp = d / f"{split}.tower_tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            ds = ray.data.read_parquet(str(src)).map_batches(
                TowerFeatures,
                fn_constructor_kwargs={"shards_dir": str(d), "modality": m},
                batch_size=batch_size,
                batch_format="pyarrow",
                concurrency=concurrency,
            )
            ds.write_parquet(str(tmp))
            shutil.rmtree(src)
            tmp.rename(src)
        record[m] = {"tower": ref, "revision": tower_revision(ref)}
    (d / CACHE_FILE).write_text(json.dumps(record, indent=2))
    return record


def check_cache(shards_dir: str | Path, sections: dict[str, Any]) -> list[str]:
    """Modalities whose cached features the run may read.

    Args:
        shards_dir: Prepared shards.
        sections: ``{m: encoders.<m> section dict}`` of the run's model.

    Raises:
        TowerError: the cache was made by another tower revision than the model's.
    """
    path = Path(shards_dir) / CACHE_FILE
    if not path.is_file():
        return []
    record = json.loads(path.read_text())
    usable = []
    for m, rec in record.items():
        sec = sections.get(m) or {}
        if sec.get("kind") != "hf":
            continue
        want = sec.get("revision") or tower_revision(sec["tower"])
        if rec.get("revision") != want:
            raise TowerError(
                f"{path}: {m} features were computed by tower revision {rec.get('revision')} "
                f"({rec.get('tower')}), the model's tower {sec.get('tower')} is revision "
                f"{want}; run `python -m jobs.tower_cache --shards {shards_dir}` again"
            )
        usable.append(m)
    return usable


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", required=True)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    import ray

    ray.init(ignore_reinit_error=True)
    print(json.dumps(build_cache(args.shards, batch_size=args.batch_size), indent=2))


if __name__ == "__main__":
    main()
