"""Fit or refine an export's generation heads on cached embeddings (see
:mod:`jobs.training.generation`).

    python -m jobs.fit_generation --export RUN/export --shards DATA_prepared --out RUN/export_gen
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    from jobs.training.generation import FitGenerationConfig, fit_generation_heads
    from models.generation import generation_targets

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--export", required=True, help="export directory (Contract 3)")
    ap.add_argument("--shards", required=True, help="prepared shards (its train split)")
    ap.add_argument("--out", required=True, help="new export directory (may equal --export)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-rows", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--targets",
        nargs="+",
        default=None,
        help="heads added to an export without any (default: every modality with a "
        "generation space)",
    )
    ap.add_argument("--hidden", type=int, default=256, help="width of added vector heads")
    ap.add_argument("--blocks", type=int, default=3, help="residual blocks of added heads")
    ap.add_argument("--cache", default=None, help="file caching the embedded train split")
    ap.add_argument("--log-every", type=int, default=250)
    a = ap.parse_args(argv)
    cfg = FitGenerationConfig(
        steps=a.steps,
        batch=a.batch,
        lr=a.lr,
        max_rows=a.max_rows,
        seed=a.seed,
        generation={
            "targets": list(a.targets or generation_targets()),
            "hidden": a.hidden,
            "blocks": a.blocks,
        },
        cache=a.cache,
        log_every=a.log_every,
    )
    try:
        res = fit_generation_heads(a.export, a.shards, a.out, cfg)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"fit_generation: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
