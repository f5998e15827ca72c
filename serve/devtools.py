"""Helpers for tests and benchmarks of the service: an untrained export and a gallery split.

Not used by the service itself. ``make_untrained_export`` writes a Contract-3 export
(``model.safetensors``, ``model_config.yaml``, ``tokenizer/``, ``data_config.yaml``,
``metrics.json``) of a named size with random weights, so the service can be exercised
(and its speed measured) without a training run. ``write_gallery_split`` featurizes a
Contract-1 manifest with the shared featurizers into Contract-2 shards.

    python -m serve.devtools --size small --out runs/serve_bench/export \
        [--manifest data/omnidigits/manifest.jsonl --split-out runs/serve_bench/gallery]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pipelines.schema import MODALITIES

DEFAULT_TEXTS: tuple[str, ...] = tuple(
    f"{p}{w}"
    for w in ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    for p in ("", "the digit ", "a handwritten ", "number ")
)


def make_untrained_export(
    out: str | Path,
    *,
    size: str = "tiny",
    texts: list[str] | tuple[str, ...] = DEFAULT_TEXTS,
    vocab_size: int = 512,
    num_classes: int = 10,
    seed: int = 0,
) -> Path:
    """Writes an export directory with a randomly initialized model of ``size``.

    Args:
        out: Export directory to create.
        size: Named model size (``tiny``, ``small``, ``base``).
        texts: Text the BPE tokenizer is trained on.
        vocab_size: Tokenizer vocabulary size (the model's ``vocab_size`` follows it).
        num_classes: Classes of the classification head.
        seed: Torch seed for the weights.

    Returns:
        ``out`` as a Path.
    """
    import torch

    from common.config import save_yaml
    from models.config import OmniConfig
    from models.model import build_model
    from pipelines.config import DataConfig
    from pipelines.tokenizer import train_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(list(texts), out / "tokenizer", vocab_size=vocab_size)
    data_cfg = DataConfig(name=f"untrained-{size}")
    save_yaml(data_cfg, out / "data_config.yaml")
    torch.manual_seed(seed)
    cfg = OmniConfig.from_name(size, vocab_size=tok.get_vocab_size(), num_classes=num_classes)
    build_model(cfg).eval().save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps({"note": "untrained export (serve.devtools)"}))
    return out


def featurize_manifest_rows(
    manifest: str | Path,
    export_dir: str | Path,
    *,
    max_rows: int | None = None,
) -> list[dict[str, Any]]:
    """Featurizes the rows of a Contract-1 JSONL manifest like the pipeline does.

    Files that fail to featurize (the demo corpus plants corrupt ones) are left out of
    their row; rows left without any modality are dropped.

    Returns:
        Rows ``{"id", "label", "group", m: np.ndarray, ...}``.
    """
    from pipelines.featurize import SampleError, get_featurizer
    from serve.runtime import load_feature_config

    manifest = Path(manifest)
    root = manifest.parent
    fcfg = load_feature_config(export_dir)
    feats = {
        m: get_featurizer(
            m,
            fcfg,
            **({"tokenizer_dir": str(Path(export_dir) / "tokenizer")} if m == "text" else {}),
        )
        for m in MODALITIES
    }
    rows = []
    with open(manifest) as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            row: dict[str, Any] = {
                "id": rec["id"],
                "label": rec.get("label"),
                "group": rec.get("group"),
            }
            for m in MODALITIES:
                v = rec.get(m)
                if v is None:
                    continue
                try:
                    if m == "text":
                        row[m] = feats[m].from_text(v)
                    else:
                        p = root / v
                        row[m] = feats[m].from_bytes(p.read_bytes(), suffix=p.suffix)
                except (SampleError, OSError):
                    continue
            if any(m in row for m in MODALITIES):
                rows.append(row)
            if max_rows is not None and len(rows) >= max_rows:
                break
    return rows


def write_gallery_split(rows: list[dict[str, Any]], out_dir: str | Path) -> Path:
    """Writes featurized rows as one Contract-2 shard ``out_dir/part-00000.parquet``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.schema import pack_tensors, shard_schema

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: r["id"])
    cols: dict[str, Any] = {
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "label": pa.array([r.get("label") for r in rows], pa.string()),
        "group": pa.array([r.get("group") for r in rows], pa.string()),
        "modalities": pa.array(
            [[m for m in MODALITIES if m in r] for r in rows], pa.list_(pa.string())
        ),
    }
    for m in MODALITIES:
        data, shape = pack_tensors(m, [r.get(m) for r in rows])
        cols[m] = data
        cols[f"{m}_shape"] = shape
    table = pa.Table.from_pydict(cols, schema=shard_schema())
    path = out_dir / "part-00000.parquet"
    pq.write_table(table, path)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--out", required=True, help="export directory to write")
    ap.add_argument("--manifest", help="Contract-1 manifest to build a gallery split from")
    ap.add_argument("--split-out", help="where to write the gallery split")
    ap.add_argument("--max-rows", type=int, default=None)
    a = ap.parse_args(argv)
    texts = list(DEFAULT_TEXTS)
    if a.manifest:
        with open(a.manifest) as f:
            texts += [json.loads(x).get("text") or "" for x in f if x.strip()]
    export = make_untrained_export(a.out, size=a.size, texts=[t for t in texts if t])
    print(f"export: {export}")
    if a.manifest and a.split_out:
        rows = featurize_manifest_rows(a.manifest, export, max_rows=a.max_rows)
        print(f"gallery: {write_gallery_split(rows, a.split_out)} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
