"""Export trained weights (Contract 3) from a run's DeepSpeed checkpoints.

    python -m jobs.export --config configs/train/demo_small.yaml [key=value ...]
        [--stage finetune] [--checkpoint PATH] [--out DIR]

Without ``--checkpoint`` the stage's consolidated weights are used (made by ``jobs.train``
at the end of each stage) or, when the stage was interrupted, its newest complete DeepSpeed
checkpoint is consolidated (any ZeRO stage; ZeRO-3 via ``zero_to_fp32``). The export dir
holds ``model.safetensors``, ``model_config.yaml``, ``tokenizer/``, ``data_config.yaml``,
``zero_shot.yaml``, ``metrics.json`` and ``training.yaml``; it is written by
:func:`jobs.exports.write_export` and read by :func:`jobs.exports.load_export` (model,
featurizers, zero-shot templates; fails loudly on a missing file or mismatched sizes).
"""

from __future__ import annotations

import argparse
import sys

from common.config import ConfigError
from jobs.training.config import STAGES, load_train_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.export", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="the training YAML of the run")
    p.add_argument("--stage", choices=STAGES, default=None, help="default: the last with weights")
    p.add_argument("--checkpoint", default=None, help="a DeepSpeed checkpoint dir to consolidate")
    p.add_argument("--out", default=None, help="export dir (default: the config's export_dir)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_train_config(args.config, args.overrides)
    except (ConfigError, ValueError) as e:
        print(f"jobs.export: {e}", file=sys.stderr)
        return 2
    from jobs.training.runner import export_from_config

    try:
        out = export_from_config(cfg, stage=args.stage, checkpoint=args.checkpoint, out=args.out)
    except FileNotFoundError as e:
        print(f"jobs.export: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
