"""Prepare a corpus: manifest -> Parquet shards, tokenizer, quarantine, stats (Contract 2).

Usage::

    python -m jobs.prepare --manifest data/omnidigits/manifest.jsonl --out data/prepared \
        [--config configs/data/omnidigits.yaml] [key=value ...]

    # the same against a cluster:
    ray job submit --working-dir . -- python -m jobs.prepare --manifest s3://b/m.jsonl --out ...

Connects to the cluster given by ``--address`` or ``RAY_ADDRESS`` (as under
``ray job submit``), otherwise starts a local Ray.
"""

from __future__ import annotations

import argparse
import os
import sys

from common.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.prepare", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--manifest", required=True, help="manifest path or URI (.jsonl/.csv/.parquet)"
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--config", default=None, help="data config YAML (configs/data/*.yaml)")
    parser.add_argument(
        "--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)"
    )
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray")
    parser.add_argument(
        "--verbose", action="store_true", help="everything on the terminal (no log file)"
    )
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = parser.parse_args(argv)

    from common.towers import TowerError
    from pipelines.config import load_data_config

    try:
        cfg = load_data_config(args.config, args.overrides)
        # Pretrained towers are checked here, before any Ray worker starts.
        from pipelines.featurize import get_featurizer

        for m in cfg.features.to_config_dict():
            if m != "max_file_bytes" and getattr(cfg.features.section(m), "tower", ""):
                get_featurizer(m, cfg.features)
    except (ConfigError, TowerError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2

    from jobs.console import log_path_for, quiet_console

    log = log_path_for("prepare", args.out)
    with quiet_console("prepare", log, verbose=args.verbose):
        return _run(args, cfg)


def _run(args: argparse.Namespace, cfg) -> int:
    import time

    import ray

    from jobs.console import format_duration, ray_data_progress, say
    from jobs.ray_connect import connect_ray
    from pipelines.prepare import run_prepare
    from pipelines.stages import ManifestError

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    say(f"[prepare] {args.manifest} -> {args.out}")
    t0 = time.perf_counter()
    started = connect_ray(args.address, args.num_cpus)
    try:
        with ray_data_progress("[prepare]"):
            stats = run_prepare(args.manifest, args.out, cfg)
        from jobs.tower_cache import build_cache, cached_modalities

        if cached_modalities(args.out):  # features.<m>.cache: frozen-tower features, once
            build_cache(args.out)
    except (ManifestError, ConfigError) as e:  # the data does not fit the config: one line
        msg = f"error: {' '.join(str(e).split())}"
        say(msg, err=True)
        return 2
    finally:
        if started:
            ray.shutdown()
    w = stats["rows_written"]
    q = stats["quarantined"]
    say(
        f"[prepare] done in {format_duration(time.perf_counter() - t0)}: read {stats['rows_read']}"
        f" rows, wrote train {w.get('train', 0)} / val {w.get('val', 0)} / test {w.get('test', 0)}"
        f", quarantined {q.get('records', 0)} inputs (details: {args.out}/stats.json)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
