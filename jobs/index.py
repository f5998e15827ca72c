"""Build the gallery index of an embedding directory (exact or HNSW, recall measured).

Usage::

    python -m jobs.index --embeddings runs/demo/embeddings [kind=auto|exact|hnsw] \
        [exact_max=200000] [hnsw_m=32] [ef_construction=80] [ef_search=64] [recall_queries=200]

Writes ``EMBEDDINGS/index/index.json`` (+ ``<modality>.faiss`` for HNSW indexes); the
service loads it with the gallery (``gallery.embeddings_dir``). ``jobs.embed`` runs this
at its end unless ``--no-index``.
"""

from __future__ import annotations

import argparse
import sys

from common.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.index", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--embeddings", required=True, help="embedding directory of jobs.embed")
    parser.add_argument("--config", default=None, help="index config YAML")
    parser.add_argument("overrides", nargs="*", help="key=value IndexConfig overrides")
    args = parser.parse_args(argv)

    from common.config import load_config
    from jobs.embedding.index import IndexConfig, build_index
    from jobs.embedding.output import EmbeddingDirError

    try:
        try:
            cfg = load_config(IndexConfig, args.config, args.overrides)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"index config: {e}") from e
        build_index(args.embeddings, cfg, verbose=True)
    except (ConfigError, EmbeddingDirError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
