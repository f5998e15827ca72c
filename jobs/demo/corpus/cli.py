"""``python -m jobs.demo.corpus``: build the OmniDigits demo corpus from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jobs.demo.corpus.build import build_corpus
from jobs.demo.corpus.plan import CorpusError


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.demo.corpus",
        description="Build the OmniDigits demo corpus (digits 0-9 in text, image, audio, "
        "video, pointcloud and signal) as manifest.jsonl + files.",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--n", type=int, default=2000, help="number of rows (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="RNG seed (default 0)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--modality-drop", type=float, default=0.15,
                   help="per-modality drop probability (default 0.15)")  # fmt: skip
    p.add_argument("--corrupt-frac", type=float, default=0.01,
                   help="fraction of files written corrupt (default 0.01)")  # fmt: skip
    p.add_argument("--dup-frac", type=float, default=0.01,
                   help="fraction of duplicate rows (default 0.01)")  # fmt: skip
    p.add_argument("--hard-frac", type=float, default=0.05,
                   help="per-modality probability of an ambiguous instance (default 0.05)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing corpus")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        manifest = build_corpus(
            args.out,
            n=args.n,
            seed=args.seed,
            workers=args.workers,
            modality_drop=args.modality_drop,
            corrupt_frac=args.corrupt_frac,
            dup_frac=args.dup_frac,
            hard_frac=args.hard_frac,
            overwrite=args.overwrite,
        )
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = json.loads((manifest.parent / "corpus_info.json").read_text())
    print(
        f"wrote {manifest} ({info['rows']} rows, {len(info['corrupt'])} corrupt files, "
        f"{len(info['duplicates'])} duplicates) in {info['build_seconds']:.1f}s; "
        f"counts {info['counts']}"
    )
    return 0
