"""Throughput, parallel efficiency and driver memory of the prepare pipeline.

Runs, on the same manifest rows of the OmniDigits demo corpus:

1. a plain single-process Python loop doing the same read + decode + validate +
   featurize work (per-modality cost measured here);
2. the Ray Data pipeline (``pipelines.prepare.run_prepare``) on a local Ray with
   ``--num-cpus`` CPUs;

3. ``num_cpus`` copies of the loop at once in plain processes (no Ray): the machine's own
   ceiling for this work (cores share caches and memory bandwidth);

and reports samples/s for all, parallel efficiency = pipeline / (num_cpus x loop), and
the driver's peak RSS for ``--rows`` vs ``--big-rows`` manifest rows (rows repeated under
new ids, dedupe off), each measured in a fresh subprocess.

What is timed. The loop: the decode + featurize work only, after its process start and
imports (its featurizers' libraries are loaded before the clock starts), and without the
dedupe keys, planning, tokenizing and writing the pipeline also does. The pipeline:
``run_prepare`` end to end (Ray Data start-up, each worker's imports, both stages, the
writes), from the moment the local Ray cluster is up: after ``ray.init`` and its worker
processes' start (a trivial task per CPU; ``worker_start_seconds``), the counterpart of
the loop's process start. ``parallel_efficiency_incl_worker_start`` also charges that
start to the pipeline (the definition of the figures recorded before 2026-11-23).
``decode_stage`` figures time only stage 1 (from ``run_prepare``'s start to the end of the
decode stage). The machine load (load
average, busiest other processes) is recorded before and after, since timings on a
shared machine are only meaningful next to it.

``--preset realistic`` measures the same at the realistic preset
(``configs/data/realistic.yaml``: JPEG decode + resize to 224 px) on an image-only corpus of
distinct camera-sized JPEG photos (640x480 / 480x640, quality 90) cut from the real photos
scikit-learn ships (random crops, flips, colour and brightness jitter; built once under
``data/realistic_photos``, ``--corpus-rows`` of them, 8,000 by default), and reports images/s
per core of the pipeline next to the plain loop of the same featurizer (the anchor on this
machine kind: 464-675 img/s per core). The memory runs then use distinct rows when the corpus
has enough (``--big-rows`` distinct JPEGs: the >= 8,000-row whole-job efficiency).

Usage::

    .venv/bin/python benchmarks/prepare_throughput.py            # builds the corpus if missing
    .venv/bin/python benchmarks/prepare_throughput.py --rows 500 --big-rows 2000 --no-memory
    .venv/bin/python benchmarks/prepare_throughput.py --preset realistic   # 2k + 8k rows
    .venv/bin/python benchmarks/prepare_throughput.py --preset realistic --quick   # smoke

Writes ``benchmarks/results/prepare_throughput.json`` (``--preset realistic``:
``prepare_throughput_realistic.json``; ``--quick``: ``..._quick.json`` in the temp dir).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def machine_load() -> dict:
    """Load average and the busiest processes that are not this benchmark."""
    load = os.getloadavg()
    try:
        ps = subprocess.run(
            ["ps", "-eo", "pid,pcpu,rss,etimes,args", "--sort=-pcpu"],
            capture_output=True, text=True, timeout=10,
        ).stdout.splitlines()[1:13]  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        ps = []
    me = os.getpid()
    top = []
    for line in ps:
        parts = line.split(None, 4)
        if len(parts) == 5 and int(parts[0]) != me:
            top.append({"pid": int(parts[0]), "cpu_pct": float(parts[1]),
                        "rss_mb": round(int(parts[2]) / 1024), "cmd": parts[4][:120]})  # fmt: skip
    return {"loadavg_1_5_15": [round(x, 2) for x in load], "cpu_count": os.cpu_count(),
            "top_processes": top}  # fmt: skip


def ensure_corpus(corpus: Path, n: int, preset: str = "demo", workers: int = 2) -> Path:
    manifest = corpus / "manifest.jsonl"
    if preset == "realistic":
        have = sum(1 for _ in open(manifest)) if manifest.exists() else 0
        if have < n:
            print(f"building {n} JPEG photos in {corpus} ...", flush=True)
            build_photo_corpus(corpus, n, workers)
        return manifest
    if not manifest.exists():
        print(f"building the demo corpus in {corpus} ({n} rows) ...", flush=True)
        subprocess.run(
            [sys.executable, "-m", "jobs.demo.corpus", "--out", str(corpus), "--n", str(n),
             "--seed", "0", "--workers", "2"],
            cwd=ROOT, check=True,
        )  # fmt: skip
    return manifest


FILE_KEYS = ("image", "audio", "video", "pointcloud", "signal")
PRESETS = {
    "demo": {"config": "configs/data/omnidigits.yaml", "corpus": "data/omnidigits"},
    "realistic": {"config": "configs/data/realistic.yaml", "corpus": "data/realistic_photos"},
}


def _photo(args: tuple[int, int]) -> tuple[str, bytes, str]:
    """Distinct JPEG photo ``i`` (a jittered crop of a real photo): ``(path, bytes, label)``."""
    import io

    import numpy as np
    from PIL import Image, ImageEnhance
    from sklearn.datasets import load_sample_image

    i, seed = args
    rng = np.random.default_rng([seed, i])
    name = ("china.jpg", "flower.jpg")[i % 2]
    src = Image.fromarray(load_sample_image(name))  # 640x427 RGB
    w, h = (640, 480) if rng.random() < 0.7 else (480, 640)
    scale = rng.uniform(0.45, 1.0)
    cw = int(min(src.width, src.height * w / h) * scale)
    ch = int(cw * h / w)
    x0 = int(rng.integers(0, src.width - cw + 1))
    y0 = int(rng.integers(0, src.height - ch + 1))
    img = src.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.6, 1.4))
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.7, 1.3))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    rel = f"images/{i:06d}.jpg"
    return rel, buf.getvalue(), name.split(".")[0]


def build_photo_corpus(corpus: Path, n: int, workers: int) -> Path:
    """``n`` distinct camera-sized JPEGs + ``manifest.jsonl`` (image, label, id)."""
    from multiprocessing import Pool

    (corpus / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    with Pool(max(1, workers)) as pool:
        for rel, data, label in pool.imap(_photo, [(i, 0) for i in range(n)], chunksize=64):
            (corpus / rel).write_bytes(data)
            rows.append({"id": f"p{len(rows):07d}", "image": rel, "label": label})
    tmp = corpus / "manifest.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.rename(corpus / "manifest.jsonl")  # last: a complete corpus has a manifest
    return corpus / "manifest.jsonl"


def take_rows(manifest: Path, n: int, out: Path, repeat_to: int | None = None) -> Path:
    """The first ``n`` rows; with ``repeat_to``, cycled under new ids up to that count.

    Paths become absolute so the manifest can live outside the corpus (the corpus is
    then passed as an ``extra_roots`` entry); the corpus folder is never written to.
    """
    root = manifest.parent.resolve()
    lines = [ln for ln in manifest.read_text().splitlines() if ln.strip()][:n]
    rows = [json.loads(ln) for ln in lines]
    for r in rows:
        for k in FILE_KEYS:
            if r.get(k):
                r[k] = str(root / r[k])
    if repeat_to:
        rows = [dict(rows[i % len(rows)], id=f"r{i:07d}") for i in range(repeat_to)]
    with open(out, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return out


def loop_baseline(manifest: Path, cfg, corpus: Path) -> dict:
    """Single process: resolve + read + decode + featurize every modality of every row."""
    from pipelines.featurize import SampleError, get_featurizer
    from pipelines.paths import PathResolver, manifest_root
    from pipelines.schema import MODALITIES

    resolver = PathResolver(manifest_root(str(manifest)), [str(corpus.resolve())])
    feats = {m: get_featurizer(m, cfg.features) for m in MODALITIES}
    cost: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    rows = [json.loads(ln) for ln in manifest.read_text().splitlines() if ln.strip()]
    t0 = time.perf_counter()
    for r in rows:
        for m in MODALITIES:
            v = r.get(m)
            if not v:
                continue
            t = time.perf_counter()
            try:
                if feats[m].accepts_inline(v):
                    feats[m].decode(v)
                else:
                    data = resolver.read(v, cfg.features.max_file_bytes)
                    feats[m].decode(data, suffix="." + v.rsplit(".", 1)[-1])
            except SampleError:
                pass
            cost[m] += time.perf_counter() - t
            count[m] += 1
    wall = time.perf_counter() - t0
    return {
        "rows": len(rows),
        "seconds": round(wall, 3),
        "samples_per_s": round(len(rows) / wall, 2),
        "per_modality_ms": {m: round(1000 * cost[m] / count[m], 3) for m in cost},
        "per_modality_share": {m: round(cost[m] / sum(cost.values()), 3) for m in cost},
    }


def _cluster_ready(seconds: float) -> int:
    time.sleep(seconds)  # held long enough that num_cpus calls occupy num_cpus workers
    return os.getpid()


def pipeline_run(
    manifest: Path, out: Path, num_cpus: int, overrides: list[str], config: str
) -> dict:
    """Runs the pipeline in this process (fresh local Ray); returns timings + driver RSS."""
    import ray

    from pipelines.config import load_data_config
    from pipelines.prepare import run_prepare

    cfg = load_data_config(ROOT / config, ["execution.progress_bars=false", *overrides])
    tmp = tempfile.mkdtemp(prefix="ray_b_", dir="/tmp")
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _temp_dir=tmp,
             configure_logging=False, log_to_driver=False)  # fmt: skip
    try:
        # ray.init returns before its worker processes have started (~1 s of CPU each,
        # importing ray). Starting the clock once they run a trivial task counts that
        # boot as part of starting the cluster, as the loop's clock starts after its own
        # process start and imports. The trivial task loads nothing of the pipeline's.
        t_init = time.perf_counter()
        ready = ray.remote(num_cpus=1)(_cluster_ready)
        ray.get([ready.remote(0.2) for _ in range(num_cpus)])
        t0 = time.perf_counter()
        stats = run_prepare(manifest, out, cfg, verbose=False)
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    return {
        "rows": stats["rows_read"],
        "written": stats["rows_written"]["total"],
        "seconds": round(wall, 3),
        "worker_start_seconds": round(t0 - t_init, 3),
        "samples_per_s_incl_worker_start": round(stats["rows_read"] / (wall + t0 - t_init), 2),
        "decode_stage_seconds": stats["decode_seconds"],
        "stage_seconds": stats["stage_seconds"],
        "samples_per_s": round(stats["rows_read"] / wall, 2),
        "decode_stage_samples_per_s": round(stats["rows_read"] / stats["decode_seconds"], 2),
        "accounting_ok": stats["accounting"]["ok"],
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _subprocess_run(
    manifest: Path, out: Path, num_cpus: int, overrides: list[str], config: str
) -> dict:
    # A fresh interpreter per measurement: ru_maxrss is a lifetime peak.
    cmd = [sys.executable, __file__, "--_child", str(manifest), str(out), str(num_cpus),
           json.dumps(overrides), config]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def concurrent_loops(manifest: Path, corpus: Path, n: int, config: str) -> dict:
    """``n`` copies of the single-process loop at once, in plain processes (no Ray): what
    ``n`` cores give this work on this machine (shared caches, memory bandwidth, a VM's
    neighbours), the ceiling any parallel pipeline is measured against."""
    cmd = [sys.executable, __file__, "--_loop", str(manifest), str(corpus), config]
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(n)
    ]
    runs = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"loop child failed:\n{err[-3000:]}")
        runs.append(json.loads(out.strip().splitlines()[-1]))
    return {
        "processes": n,
        "samples_per_s_each": [r["samples_per_s"] for r in runs],
        "samples_per_s_total": round(sum(r["samples_per_s"] for r in runs), 2),
    }


def per_core_figures(result: dict, args) -> dict:
    """Images/s per core: the pipeline (whole job and decode stage) vs the plain loop."""
    n = args.num_cpus
    out = {
        "images_per_s_per_core": {
            "loop_single_process": result["loop_samples_per_s_mean"],
            "pipeline_whole_job": round(result["pipeline"]["samples_per_s"] / n, 2),
            "pipeline_decode_stage": round(result["pipeline"]["decode_stage_samples_per_s"] / n, 2),
            "anchor_this_machine_kind": "464-675",
        }
    }
    big = (result.get("driver_memory") or {}).get(str(args.big_rows))
    if big:
        out["images_per_s_per_core"][f"pipeline_whole_job_{args.big_rows}_rows"] = round(
            big["samples_per_s"] / n, 2
        )
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        manifest, out, ncpu, ov, config = sys.argv[2:7]
        print(
            json.dumps(pipeline_run(Path(manifest), Path(out), int(ncpu), json.loads(ov), config))
        )
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--_loop":
        from pipelines.config import load_data_config

        cfg = load_data_config(ROOT / sys.argv[4])
        print(json.dumps(loop_baseline(Path(sys.argv[2]), cfg, Path(sys.argv[3]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                    help="demo: OmniDigits + omnidigits.yaml; realistic: JPEG photos at 224 px")  # fmt: skip
    ap.add_argument("--corpus", default=None, help="default: the preset's (built if missing)")
    ap.add_argument("--corpus-rows", type=int, default=None,
                    help="rows when building it (demo 2000, realistic 8000 distinct JPEGs)")  # fmt: skip
    ap.add_argument("--rows", type=int, default=None, help="default 2000 (--quick 100)")
    ap.add_argument("--big-rows", type=int, default=None, help="default 4 x rows")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--no-memory", action="store_true", help="skip the rows vs big-rows runs")
    ap.add_argument("--quick", action="store_true",
                    help="smoke: 100 vs 400 rows (realistic: a 400-photo corpus in /tmp)")  # fmt: skip
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    preset = PRESETS[args.preset]
    config = preset["config"]
    args.rows = args.rows or (100 if args.quick else 2000)
    args.big_rows = args.big_rows or 4 * args.rows
    realistic = args.preset == "realistic"
    if args.corpus_rows is None:
        args.corpus_rows = args.big_rows if realistic else 2000
    if args.corpus is None:
        quick_dir = Path(tempfile.gettempdir()) / "prep_bench_quick_photos"
        args.corpus = str(quick_dir if realistic and args.quick else ROOT / preset["corpus"])
    if args.out is None:
        stem = "prepare_throughput" + ("_realistic" if realistic else "")
        # Smoke figures are not results: --quick writes to the temp dir.
        folder = Path(tempfile.gettempdir()) if args.quick else ROOT / "benchmarks/results"
        args.out = str(folder / f"{stem}{'_quick' if args.quick else ''}.json")

    from pipelines.config import load_data_config

    corpus = Path(args.corpus)
    manifest = ensure_corpus(corpus, args.corpus_rows, args.preset, args.num_cpus)
    result: dict = {
        "benchmark": "prepare_throughput",
        "preset": args.preset,
        "data_config": config,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "python": platform.python_version(),
        "num_cpus": args.num_cpus,
        "corpus": str(corpus),
        "load_before": machine_load(),
    }
    work = Path(tempfile.mkdtemp(prefix="prep_bench_"))
    if not realistic:
        # A private snapshot: colleagues may rebuild the shared corpus while this runs (only
        # this script writes the photo corpus, which is too big to copy for every run).
        shutil.copytree(corpus, work / "corpus")
        result["corpus_snapshot"] = str(work / "corpus")
        corpus, manifest = work / "corpus", work / "corpus" / "manifest.jsonl"
    rows_m = take_rows(manifest, args.rows, work / f"rows_{args.rows}.jsonl")
    roots = [f"extra_roots=[{corpus.resolve()}]"]
    try:
        cfg = load_data_config(ROOT / config)
        print(f"loop baseline on {args.rows} rows ...", flush=True)
        result["loop"] = loop_baseline(rows_m, cfg, corpus)
        print(f"  {result['loop']}", flush=True)
        print(f"pipeline on {args.rows} rows, {args.num_cpus} CPUs ...", flush=True)
        result["pipeline"] = _subprocess_run(rows_m, work / "p", args.num_cpus, roots, config)
        print(f"  {result['pipeline']}", flush=True)
        # The machine is shared: measure the loop again after the pipeline and compare
        # against the mean, so a load change between the two runs is visible and halved.
        print("loop baseline again ...", flush=True)
        result["loop_after"] = loop_baseline(rows_m, cfg, corpus)
        print(f"  {result['loop_after']}", flush=True)
        loop_rate = (result["loop"]["samples_per_s"] + result["loop_after"]["samples_per_s"]) / 2
        result["loop_samples_per_s_mean"] = round(loop_rate, 2)
        result["parallel_efficiency"] = round(
            result["pipeline"]["samples_per_s"] / (args.num_cpus * loop_rate), 3
        )
        result["parallel_efficiency_incl_worker_start"] = round(
            result["pipeline"]["samples_per_s_incl_worker_start"] / (args.num_cpus * loop_rate), 3
        )
        result["parallel_efficiency_decode_stage"] = round(
            result["pipeline"]["decode_stage_samples_per_s"] / (args.num_cpus * loop_rate), 3
        )
        print(f"{args.num_cpus} loops at once (no Ray): the machine's own ceiling ...", flush=True)
        ceiling = concurrent_loops(rows_m, corpus, args.num_cpus, config)
        ceiling["efficiency"] = round(
            ceiling["samples_per_s_total"] / (args.num_cpus * loop_rate), 3
        )
        result["concurrent_loops"] = ceiling
        print(f"  {ceiling}", flush=True)
        if not args.no_memory:
            no_dedupe = ["dedupe.exact=[]", "dedupe.near=[]"]
            mem = {}
            for n in (args.rows, args.big_rows):
                # Distinct rows as far as the corpus has them, then repeated under new ids.
                m = take_rows(manifest, n, work / f"rep_{n}.jsonl", repeat_to=n)
                r_distinct = min(n, sum(1 for _ in open(manifest)))
                print(f"driver memory run: {n} rows ({r_distinct} distinct, dedupe off) ...",
                      flush=True)  # fmt: skip
                r = _subprocess_run(m, work / f"m{n}", args.num_cpus, no_dedupe + roots, config)
                r["distinct_rows"] = r_distinct
                mem[str(n)] = r
                print(f"  {r}", flush=True)
                m.unlink()
            result["driver_memory"] = mem
            a, b = mem[str(args.rows)], mem[str(args.big_rows)]
            result["driver_peak_rss_ratio"] = round(
                b["driver_peak_rss_mb"] / a["driver_peak_rss_mb"], 3
            )
            # Fixed costs (Ray Data start-up, worker imports, the exchange) weigh less here.
            result[f"parallel_efficiency_{args.big_rows}_rows"] = round(
                b["samples_per_s"] / (args.num_cpus * loop_rate), 3
            )
            result[f"parallel_efficiency_decode_stage_{args.big_rows}_rows"] = round(
                b["decode_stage_samples_per_s"] / (args.num_cpus * loop_rate), 3
            )
        if realistic:
            result.update(per_core_figures(result, args))
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    result["load_after"] = machine_load()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("load")}, indent=2))
    print(f"load before {result['load_before']['loadavg_1_5_15']}, "
          f"after {result['load_after']['loadavg_1_5_15']}; wrote {args.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
