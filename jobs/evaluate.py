"""Evaluate an export on a prepared split: classification, retrieval, zero-shot, fusion, emergence.

    python -m jobs.evaluate --export DIR --data SHARDS_DIR [--split test] [--out DIR]
        [--config configs/eval/default.yaml] [--aligned-pairs text-image,text-audio] [key=value ...]

Runs unchanged under ``ray job submit --working-dir . -- python -m jobs.evaluate ...`` (the
test split is small: it is read with pyarrow and encoded in batches on the driver).

Writes ``<out>/metrics.json`` (default ``<export>/eval/<split>/``), merges the same results
under ``"evaluation" → <split>`` into ``<export>/metrics.json``, draws ``retrieval_r1.png``,
``embeddings_2d.png``, ``zero_shot.png``, ``fusion.png`` and the confusion matrices
``confusion_classification.png`` (the head, per sample: each row fused over its modalities,
and each modality alone) and ``confusion_zero_shot.png``, writes ``per_class_recall.csv``
(recall of each class per head panel and zero-shot modality), and prints a compact summary:
retrieval, the emergent pairs (each direction), a table of the per-sample accuracy /
balanced accuracy of the head and of zero-shot for every labelled modality (``--brief``
leaves it out), fusion. A metric that cannot be computed (no text branch, no classification
head, modality absent from the split, ...) is recorded as ``{"skipped": "<reason>"}``; user
errors (missing export or split, corrupt config) exit with status 2 and a one-line message.
The library behind this script is :mod:`jobs.evaluation` (:func:`~jobs.evaluation.run.run_evaluation`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.config import ConfigError, load_config
from jobs.evaluation.config import EvalConfig
from jobs.evaluation.data import EvaluationError
from jobs.evaluation.report import format_summary
from jobs.evaluation.run import run_evaluation

__all__ = ["format_summary", "main", "parse_args", "run_evaluation"]

EXIT_USER_ERROR = 2


def one_line(e: BaseException) -> str:
    """An error message on one line (parser messages quote the input over several)."""
    return " ".join(str(e).split())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.evaluate",
        description="Evaluate an OmniRay export on a prepared split.",
    )
    p.add_argument("--export", required=True, type=Path, help="export dir (Contract 3)")
    p.add_argument("--data", required=True, help="prepared shards dir or URI (Contract 2)")
    p.add_argument("--split", default=None, help="split to evaluate (default: config's, 'test')")
    p.add_argument(
        "--out", type=Path, default=None, help="output dir (default <export>/eval/<split>)"
    )
    p.add_argument("--config", type=Path, default=None, help="YAML of EvalConfig")
    p.add_argument(
        "--aligned-pairs",
        default=None,
        help="comma-separated modality pairs trained together, e.g. text-image,text-audio "
        "(default: the export's training info)",
    )
    p.add_argument(
        "--brief",
        action="store_true",
        help="leave the per-sample accuracy table off the console (jobs.demo shows it on its "
        "summary screen)",
    )
    p.add_argument(
        "--verbose", action="store_true", help="everything on the terminal (no log file)"
    )
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the config")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from jobs.console import log_path_for, quiet_console

    out = args.out or Path(args.export) / "eval" / (args.split or "test")
    with quiet_console("evaluate", log_path_for("evaluate", out), verbose=args.verbose):
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    import time

    from jobs.console import format_duration, say
    from jobs.evaluation.report import compact_summary

    t0 = time.perf_counter()
    try:
        overrides = list(args.overrides)
        if args.split is not None:
            overrides.append(f"split={args.split}")
        cfg = load_config(EvalConfig, args.config, overrides)
        pairs = None
        if args.aligned_pairs is not None:
            pairs = [p for p in args.aligned_pairs.split(",") if p.strip()]
        say(f"[evaluate] {args.export} on {args.data} (split {cfg.split})")
        result = run_evaluation(args.export, args.data, cfg, args.out, aligned_pairs=pairs)
    except (EvaluationError, ConfigError) as e:
        say(f"jobs.evaluate: error: {one_line(e)}", err=True)
        return EXIT_USER_ERROR
    print(format_summary(result))  # the full table: into the log when the console is quiet
    for line in compact_summary(result, table=not args.brief):
        say(f"[evaluate] {line}")
    out = Path(args.out) if args.out else Path(args.export) / "eval" / cfg.split
    say(
        f"[evaluate] done in {format_duration(time.perf_counter() - t0)}: wrote "
        f"{out / 'metrics.json'} and {len(result.get('plots', {}))} plots"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
