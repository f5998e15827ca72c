"""Embed a corpus with an export: manifest or prepared split -> embedding directory.

Usage::

    python -m jobs.embed --export runs/demo/export --manifest data/omnidigits/manifest.jsonl \
        --out runs/demo/embeddings [--config configs/embed/demo.yaml] [key=value ...]
    python -m jobs.embed --export runs/demo/export --data data/prepared/test --out ...

    # the same against a cluster:
    ray job submit --working-dir . -- python -m jobs.embed --export ... --manifest s3://b/m.jsonl --out ...

Writes ``OUT/parts/*.parquet`` (``id, label, modality, segment, start_s, end_s, embedding,
fused``), ``OUT/stats.json``, ``OUT/quarantine.jsonl`` and ``OUT/embed.json`` (the model
revision), then the gallery index (``OUT/index/``, as ``python -m jobs.index``; skip it
with ``--no-index``). A re-run skips finished parts; a changed export is refused unless
``--overwrite``. Connects to ``--address`` or ``RAY_ADDRESS``, otherwise starts a local Ray.
"""

from __future__ import annotations

import argparse
import os
import sys

from common.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.embed", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--export", required=True, help="export directory (Contract 3)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="manifest path or URI (.jsonl/.csv/.parquet)")
    src.add_argument("--data", help="a prepared split directory (SHARDS/SPLIT)")
    parser.add_argument("--out", required=True, help="embedding directory (created or resumed)")
    parser.add_argument("--config", default=None, help="embed config YAML (configs/embed/*.yaml)")
    parser.add_argument("--overwrite", action="store_true", help="re-embed everything")
    parser.add_argument("--no-index", action="store_true", help="do not build the index")
    parser.add_argument("--address", default=None, help="Ray cluster address")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = parser.parse_args(argv)

    from jobs.embedding.config import load_embed_config
    from jobs.embedding.output import EmbeddingDirError
    from jobs.exports import ExportError
    from pipelines.stages import ManifestError

    def fail(e: Exception) -> int:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2

    try:
        cfg = load_embed_config(args.config, args.overrides)
    except ConfigError as e:
        return fail(e)

    import ray

    from jobs.embedding.index import build_index
    from jobs.embedding.run import run_embed
    from jobs.ray_connect import connect_ray

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = connect_ray(args.address, args.num_cpus)
    try:
        run_embed(
            args.export,
            args.out,
            manifest=args.manifest,
            data=args.data,
            config=cfg,
            overwrite=args.overwrite,
        )
        if not args.no_index:
            build_index(args.out, verbose=True)
    except (ManifestError, ConfigError, ExportError, EmbeddingDirError) as e:
        return fail(e)
    finally:
        if started:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
