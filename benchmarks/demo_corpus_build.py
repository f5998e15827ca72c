"""Benchmark: how long building the OmniDigits corpus takes.

Builds the small (test) corpus twice to check byte-identical determinism, times the
large corpus, and profiles the per-modality rendering cost in-process. Prints a summary
and writes ``benchmarks/results/demo_corpus_build.json``.

    .venv/bin/python benchmarks/demo_corpus_build.py [--n-large 2000] [--n-small 60]
        [--workers 2] [--keep data/omnidigits]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jobs.demo.corpus as dc  # noqa: E402
from jobs.demo.corpus import plan as cplan  # noqa: E402
from jobs.demo.corpus import render_audio as ra  # noqa: E402
from jobs.demo.corpus import render_image as ri  # noqa: E402
from jobs.demo.corpus import render_pointcloud as rp  # noqa: E402
from jobs.demo.corpus import render_signal as rs  # noqa: E402
from jobs.demo.corpus import render_video as rv  # noqa: E402


def _cpu_seconds() -> float:
    """CPU time of this process and of every finished descendant (workers, ffmpeg, espeak)."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _build(out: Path, n: int, seed: int, workers: int) -> dict:
    t0, c0 = time.perf_counter(), _cpu_seconds()
    dc.build_corpus(out, n=n, seed=seed, workers=workers, overwrite=True)
    seconds = time.perf_counter() - t0
    cpu = _cpu_seconds() - c0
    info = json.loads((out / "corpus_info.json").read_text())
    files = sum(1 for p in out.rglob("*") if p.is_file())
    return {
        "n": n,
        "workers": workers,
        "seconds": round(seconds, 2),
        # wall time depends on how busy the shared machine is; CPU time much less so
        "cpu_seconds": round(cpu, 2),
        "rows_per_s": round(n / seconds, 1),
        "files": files,
        "mbytes": round(info["bytes"] / 1e6, 1),
        "counts": info["counts"],
        "corrupt_files": len(info["corrupt"]),
        "duplicates": len(info["duplicates"]),
    }


def _profile(n_rows: int, seed: int) -> dict[str, float]:
    """Mean milliseconds per item to render and encode each modality (one process).

    Video clips are encoded together, as the builder does (one ffmpeg process per batch).
    """
    rows = cplan._plan_rows(n_rows, seed, 0.0, 0.0, 0.0)
    times = {m: 0.0 for m in dc.FILE_MODALITIES}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_p = Path(tmp)
        clips = []
        for row in rows:
            r = np.random.default_rng(row.index)
            t = time.perf_counter()
            ri._image_bytes(ri._render_image(row, r), "png", r)
            times["image"] += time.perf_counter() - t
            t = time.perf_counter()
            ra._audio_bytes(*ra._render_audio(row, r), "wav")
            times["audio"] += time.perf_counter() - t
            t = time.perf_counter()
            clips.append((*rv._render_video(row, r), tmp_p / f"{row.index}.mp4"))
            times["video"] += time.perf_counter() - t
            t = time.perf_counter()
            rp._write_points(rp._render_points(row, r), tmp_p / "p.ply")
            times["pointcloud"] += time.perf_counter() - t
            t = time.perf_counter()
            rs._signal_bytes(rs._trajectory(row.label, row.writer, r), "npy")
            times["signal"] += time.perf_counter() - t
        t = time.perf_counter()
        rv._encode_mp4_batch(clips)
        times["video"] += time.perf_counter() - t
        t = time.perf_counter()
        for frames, fps, path in clips[:8]:
            rv._encode_mp4(frames, fps, path)
        unbatched_ms = 1000 * (time.perf_counter() - t) / 8
    out = {m: round(1000 * v / n_rows, 2) for m, v in times.items()}
    out["video_encode_unbatched"] = round(unbatched_ms, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-large", type=int, default=2000)
    ap.add_argument("--n-small", type=int, default=60)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None,
                    help="build the large corpus here and keep it (default: a temp dir)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/demo_corpus_build.json")
    args = ap.parse_args()

    result: dict = {
        "benchmark": "demo_corpus_build",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        # The machine is shared: the load average tells how contended the timings were.
        "loadavg_1min_start": round(os.getloadavg()[0], 2),
    }
    with tempfile.TemporaryDirectory(prefix="omnidigits_bench_") as tmp:
        tmp_p = Path(tmp)
        small_a = _build(tmp_p / "small_a", args.n_small, args.seed, args.workers)
        small_b = _build(tmp_p / "small_b", args.n_small, args.seed, 1)
        same = dc.file_digest(tmp_p / "small_a") == dc.file_digest(tmp_p / "small_b")
        result["small"] = small_a
        result["small_workers1_seconds"] = small_b["seconds"]
        result["deterministic_across_workers"] = same
        print(f"n={args.n_small}: {small_a['seconds']}s ({small_a['cpu_seconds']}s CPU, "
              f"{args.workers} workers), "
              f"{small_b['seconds']}s (1 worker); byte-identical: {same}")  # fmt: skip

        result["per_item_ms"] = _profile(24, args.seed)
        print(f"per item (ms, one process): {result['per_item_ms']}")

        # A kept corpus is built beside its destination and swapped in at the end, so
        # readers of an existing copy never see a half-written one.
        keep = args.keep
        large_dir = keep.with_name(keep.name + ".building") if keep else tmp_p / "large"
        result["large"] = _build(large_dir, args.n_large, args.seed, args.workers)
        if keep is not None:
            old = keep.with_name(keep.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            if keep.exists():
                keep.rename(old)
            large_dir.rename(keep)
            shutil.rmtree(old, ignore_errors=True)
            result["large"]["kept_at"] = str(keep)
        large = result["large"]
        print(f"n={args.n_large}: {large['seconds']}s ({large['cpu_seconds']}s CPU) with "
              f"{args.workers} workers "
              f"({large['rows_per_s']} rows/s, {large['files']} files, {large['mbytes']} MB, "
              f"{large['corrupt_files']} corrupt, {large['duplicates']} duplicates)")  # fmt: skip

    result["loadavg_1min_end"] = round(os.getloadavg()[0], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
