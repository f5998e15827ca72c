"""Train an OmniRay model: Ray Train ``TorchTrainer`` + DeepSpeed ZeRO, three stages.

    python -m jobs.train --config configs/train/demo_small.yaml [key=value ...] [--stages all]
    ray job submit --working-dir . -- python -m jobs.train --config configs/train/tiny.yaml

Stages ``pretrain`` -> ``align`` -> ``finetune`` each start from the previous one's weights;
re-running the same command resumes an interrupted stage and skips finished ones. The last
stage's weights are exported (Contract 3) to ``export_dir`` (default ``runs/<name>/export``).
The library behind this script is :mod:`jobs.training`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from common.config import ConfigError
from jobs.training.config import load_train_config, parse_stages


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="training YAML (configs/train/*.yaml)")
    p.add_argument(
        "--stages", default="all", help="'all' or a comma list of pretrain,align,finetune"
    )
    p.add_argument(
        "--verbose", action="store_true", help="everything on the terminal (no log file)"
    )
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when trained; 2 with a one-line error for a config that does not fit
    (invalid values, or keys that do not match the prepared data: ``data.shards_dir``,
    ``data.modalities``, ``align.pairs``, model sizes). Failures while training keep their
    traceback: they are bugs or infrastructure, not configuration."""
    args = parse_args(argv)
    try:
        cfg = load_train_config(args.config, args.overrides)
        stages = parse_stages(args.stages, cfg)
    except (ConfigError, ValueError) as e:
        print(f"jobs.train: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    from jobs.console import format_duration, log_path_for, quiet_console, say

    with quiet_console(
        "train", log_path_for("train", f"{cfg.runs_dir}/{cfg.name}"), verbose=args.verbose
    ):
        t0 = time.perf_counter()
        try:
            from jobs.training.runner import resolve_run

            setup = resolve_run(cfg)
        except (ConfigError, ValueError) as e:
            say(f"jobs.train: error: {' '.join(str(e).split())}", err=True)
            return 2
        from jobs.training.runner import run_training

        try:
            result = run_training(cfg, stages, setup)
        finally:
            # Ray streams the workers' logs to this process from a thread; shutting down here
            # drains them into the log before the terminal gets fds 1 and 2 back.
            import ray

            if ray.is_initialized():
                ray.shutdown()
        print(json.dumps({"run_dir": result["run_dir"], "export_dir": result["export_dir"]}))
        say(f"[train] done in {format_duration(time.perf_counter() - t0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
