"""Helpers for tests and benchmarks of the service: an untrained export and a gallery split.

Not used by the service itself. ``make_untrained_export`` writes a Contract-3 export of a
named size with random weights through the one export writer (``jobs.exports.write_export``),
so the service can be exercised (and its speed measured) without a training run.
``write_gallery_split`` writes featurized rows as a Contract-2 shard through the one shard
writer (``pipelines.schema.write_shard``).

    python -m serve.devtools --size small --out runs/serve_bench/export \
        [--manifest data/omnidigits/manifest.jsonl --split-out runs/serve_bench/gallery]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

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
    modalities: list[str] | None = None,
    templates: list[str] | None = None,
    generation: dict[str, Any] | None = None,
) -> Path:
    """Writes an export directory with a randomly initialized model of ``size``.

    The model's input sizes come from the default featurizer config, as training derives
    them (``ENCODERS[m].sizes_for(featurizer.max_output_shape())``).

    Args:
        out: Export directory to create.
        size: Named model size (``tiny``, ``small``, ``base``).
        texts: Text the BPE tokenizer is trained on.
        vocab_size: Tokenizer vocabulary size (the model's ``vocab_size`` follows it).
        num_classes: Classes of the classification head.
        seed: Torch seed for the weights.
        modalities: Branches of the model (default: every declared modality).
        templates: Zero-shot templates of the export (default: ``models.zeroshot``'s).
        generation: The model's ``generation`` section (default: small heads for every
            modality of the model that has a generation space; ``{}``: none).

    Returns:
        ``out`` as a Path.
    """
    import torch

    from common.config import save_yaml
    from common.modalities import modality_names
    from jobs.exports import DATA_CONFIG_FILE, TOKENIZER_DIR, model_sizes, write_export
    from models import OmniConfig
    from models.model import build_model
    from pipelines.config import DataConfig
    from pipelines.featurize import build_featurizers
    from pipelines.tokenizer import train_tokenizer

    mods = list(modality_names() if modalities is None else modalities)
    with tempfile.TemporaryDirectory(prefix="untrained_export_") as tmp:
        shards, weights = Path(tmp) / "shards", Path(tmp) / "weights"
        shards.mkdir()
        train_tokenizer(list(texts), shards / TOKENIZER_DIR, vocab_size=vocab_size)
        data_cfg = DataConfig(name=f"untrained-{size}")
        save_yaml(data_cfg, shards / DATA_CONFIG_FILE)
        sizes = model_sizes(build_featurizers(data_cfg.features, mods, assets_dir=shards))
        if generation is None:
            from models.generation import SPACES

            targets = [m for m in mods if m in SPACES]
            generation = {"targets": targets, "hidden": 64, "blocks": 1, "point_hidden": 32}
        cfg = OmniConfig.from_name(
            size, modalities=mods, num_classes=num_classes, generation=generation, **sizes
        )
        torch.manual_seed(seed)
        build_model(cfg).eval().save_pretrained(weights)
        return write_export(
            weights,
            out,
            shards_dir=shards,
            metrics={"note": "untrained export (serve.devtools)"},
            training_info={},
            templates=templates,
        )


def featurize_manifest_rows(
    manifest: str | Path,
    export_dir: str | Path,
    *,
    max_rows: int | None = None,
) -> list[dict[str, Any]]:
    """Featurizes the rows of a Contract-1 JSONL manifest with the export's featurizers.

    A value is the item itself when the featurizer accepts it inline, else a path relative
    to the manifest. Files that fail to featurize (the demo corpus plants corrupt ones) are
    left out of their row; rows left without any modality are dropped.

    Returns:
        Rows ``{"id", "label", "group", m: np.ndarray, ...}``.
    """
    from jobs.exports import MODEL_CONFIG_FILE, load_featurizers
    from models import OmniConfig
    from pipelines.featurize import SampleError

    manifest = Path(manifest)
    root = manifest.parent
    config = OmniConfig.from_yaml(Path(export_dir) / MODEL_CONFIG_FILE)
    _, feats = load_featurizers(export_dir, config)
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
            for m, feat in feats.items():
                v = rec.get(m)
                if v is None:
                    continue
                try:
                    if feat.accepts_inline(v):
                        row[m] = feat.featurize(v)
                    else:
                        p = root / v
                        row[m] = feat.featurize(p.read_bytes(), suffix=p.suffix)
                except (SampleError, OSError):
                    continue
            if any(m in row for m in feats):
                rows.append(row)
            if max_rows is not None and len(rows) >= max_rows:
                break
    return rows


def write_gallery_split(rows: list[dict[str, Any]], out_dir: str | Path) -> Path:
    """Writes featurized rows as one Contract-2 shard ``out_dir/part-00000.parquet``."""
    from pipelines.schema import write_shard

    out_dir = Path(out_dir)
    write_shard(out_dir / "part-00000.parquet", rows)
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
        from common.modalities import MODALITIES

        with open(a.manifest) as f:
            recs = [json.loads(x) for x in f if x.strip()]
        # The tokenizer learns the inline strings of the corpus (its captions).
        texts += [
            v
            for rec in recs
            for m, v in rec.items()
            if m in MODALITIES and MODALITIES[m].inline and isinstance(v, str)
        ]
    export = make_untrained_export(a.out, size=a.size, texts=texts)
    print(f"export: {export}")
    if a.manifest and a.split_out:
        rows = featurize_manifest_rows(a.manifest, export, max_rows=a.max_rows)
        print(f"gallery: {write_gallery_split(rows, a.split_out)} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
