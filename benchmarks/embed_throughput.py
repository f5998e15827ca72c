"""``jobs.embed`` throughput vs a single-process loop of the same model and featurizers.

What it measures (issue #20; goal: parallel efficiency >= 0.8 on 2 cores, peak driver
memory flat as the corpus grows x4):

* ``single``: one process, one thread: every manifest row read, featurized with the
  export's featurizers and embedded with the export's model (``encode_features`` in
  batches of ``--batch-size`` per modality, plus the fused embedding of multi-modality
  rows), no Ray: the work ``jobs.embed`` parallelizes, done serially.
* ``pipeline`` at N and 4N rows: ``run_embed`` on a local Ray of ``--cpus`` CPUs (the
  4N manifest repeats the N rows under new ids, so the work per row is the same), with
  the driver's peak RSS growth sampled every 50 ms.
* ``parallel_efficiency = (t_single / t_pipeline(N)) / cpus``, ``t_single`` the mean of
  the loop run before and after the pipeline runs (load drifts on a shared machine).

Usage (the quiet full run; builds a 10,000-row demo corpus once, ~30 min on 2 cores)::

    python benchmarks/embed_throughput.py --rows 10000 --scale 4 --cpus 2 \
        --corpus runs/bench_embed/corpus --out benchmarks/results/embed_throughput.json

A smaller ``--rows`` proves the script on a busy machine (figures are then noise).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

# "Single process, one thread": no BLAS/OpenMP pool in the reference loop either (Ray
# workers get one thread per CPU they reserve).
os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's RSS in a thread; ``growth`` = peak - start (bytes)."""

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())
        self.growth = self.peak - self.start


def single_process(export: Path, manifest: Path, batch_size: int) -> dict:
    """The serial reference: same featurizers (export), same model, one thread."""
    import torch

    from jobs.exports import load_export
    from models.data import collate
    from pipelines.featurize import SampleError

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    ex = load_export(export, parts=["fusion"])
    feats, model = ex.featurizers, ex.model
    root = manifest.parent
    pending: dict[str, list] = {m: [] for m in feats}
    fuse_rows: dict[tuple, list] = {}
    rows = items = 0

    def flush(m: str) -> None:
        if pending[m]:
            with torch.inference_mode():
                model.encode_features(m, collate([{m: a} for a in pending[m]], modalities=(m,)))
            pending[m] = []

    def flush_fuse(combo: tuple) -> None:
        if fuse_rows.get(combo):
            b = collate(fuse_rows[combo], modalities=combo)
            with torch.inference_mode():
                model.fuse_features(model.encode_many(b, combo))
            fuse_rows[combo] = []

    with open(manifest) as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            rows += 1
            row = {}
            for m, feat in feats.items():
                v = rec.get(m)
                if v in (None, ""):
                    continue
                try:
                    if feat.accepts_inline(v):
                        row[m] = feat.featurize(v)
                    else:
                        p = root / v
                        row[m] = feat.featurize(p.read_bytes(), suffix=p.suffix)
                except (SampleError, OSError):
                    continue
            for m, a in row.items():
                items += 1
                pending[m].append(a)
                if len(pending[m]) >= batch_size:
                    flush(m)
            if len(row) > 1:
                combo = tuple(m for m in feats if m in row)
                fuse_rows.setdefault(combo, []).append(row)
                if len(fuse_rows[combo]) >= batch_size:
                    flush_fuse(combo)
    for m in pending:
        flush(m)
    for combo in list(fuse_rows):
        flush_fuse(combo)
    wall = time.perf_counter() - t0
    return {
        "rows": rows,
        "items": items,
        "seconds": round(wall, 2),
        "rows_per_s": round(rows / wall, 1),
    }


def scaled_manifest(manifest: Path, factor: int) -> Path:
    """The manifest repeated ``factor`` times under new ids (same files: same work)."""
    out = manifest.with_name(f"manifest_x{factor}.jsonl")
    lines = [x for x in manifest.read_text().splitlines() if x.strip()]
    with open(out, "w") as f:
        for k in range(factor):
            for x in lines:
                rec = json.loads(x)
                if "id" in rec and rec["id"] is not None:
                    rec["id"] = f"{rec['id']}-r{k}"
                f.write(json.dumps(rec) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--size", default="small", help="model size of the untrained export")
    ap.add_argument("--export", default=None, help="an export (default: untrained --size)")
    ap.add_argument("--corpus", default="runs/bench_embed/corpus")
    ap.add_argument("--work", default="runs/bench_embed")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rows-per-part", type=int, default=500)
    ap.add_argument("--out", default="benchmarks/results/embed_throughput.json")
    a = ap.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import ray

    from jobs.demo.corpus import build_corpus
    from jobs.embedding.config import EmbedConfig
    from jobs.embedding.run import run_embed
    from serve.devtools import DEFAULT_TEXTS, make_untrained_export

    work, corpus = Path(a.work), Path(a.corpus)
    load0 = os.getloadavg()[0]
    manifest = corpus / "manifest.jsonl"
    t = time.perf_counter()
    if not manifest.is_file() or sum(1 for _ in open(manifest)) != a.rows:
        build_corpus(corpus, n=a.rows, seed=0, workers=a.cpus, overwrite=True)
    build_s = time.perf_counter() - t
    export = Path(a.export) if a.export else work / f"export_{a.size}"
    if not a.export and not (export / "model.safetensors").is_file():
        recs = [json.loads(x) for x in open(manifest) if x.strip()]
        texts = list(DEFAULT_TEXTS) + [r["text"] for r in recs if r.get("text")][:5000]
        make_untrained_export(export, size=a.size, texts=texts)
    big = scaled_manifest(manifest, a.scale)

    single = single_process(export, manifest, a.batch_size)
    print(f"single process: {single}", file=sys.stderr, flush=True)

    ray.init(address="local", num_cpus=a.cpus, include_dashboard=False, configure_logging=False)
    cfg = EmbedConfig(rows_per_part=a.rows_per_part, batch_size=a.batch_size)
    runs = {}
    try:
        for name, m in (("N", manifest), (f"{a.scale}N", big)):
            with PeakRSS() as mem:
                t = time.perf_counter()
                stats = run_embed(
                    export, work / f"emb_{name}", manifest=str(m), config=cfg, overwrite=True
                )
                wall = time.perf_counter() - t
            runs[name] = {
                "rows": stats["rows_read"],
                "rows_embedded": stats["rows_embedded"],
                "seconds": round(wall, 2),
                "rows_per_s": round(stats["rows_read"] / wall, 1),
                "actors": stats["actors"],
                "parts": stats["parts"]["total"],
                "accounting_ok": stats["accounting"]["ok"],
                "driver_peak_rss_growth_mb": round(mem.growth / 2**20, 1),
                "driver_peak_rss_mb": round(mem.peak / 2**20, 1),
            }
            print(f"pipeline {name}: {runs[name]}", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    # The loop again after the pipeline runs: on a shared machine the load drifts, and a
    # ratio is only as good as the two measurements it brackets (both kept; mean used).
    after = single_process(export, manifest, a.batch_size)
    print(f"single process, after: {after}", file=sys.stderr, flush=True)
    single_mean_s = (single["seconds"] + after["seconds"]) / 2
    single_rate = single["rows"] / single_mean_s
    eff = (single_mean_s / runs["N"]["seconds"]) / a.cpus
    result = {
        "benchmark": "embed_throughput",
        "machine": {"cpus": os.cpu_count(), "ray_cpus": a.cpus},
        "loadavg_1min_start": round(load0, 2),
        "loadavg_1min_end": round(os.getloadavg()[0], 2),
        "model_size": a.size if not a.export else str(a.export),
        "corpus_rows": a.rows,
        "corpus_build_s": round(build_s, 1),
        "single_process": single,
        "single_process_after": after,
        "pipeline": runs,
        "parallel_efficiency": round(eff, 3),
        # The same from the rates at 4N, where actor and worker start-up weigh 4x less.
        "parallel_efficiency_4N_rate": round(
            runs[f"{a.scale}N"]["rows_per_s"] / single_rate / a.cpus, 3
        ),
        "driver_memory_growth_ratio_4N_over_N": round(
            runs[f"{a.scale}N"]["driver_peak_rss_growth_mb"]
            / max(runs["N"]["driver_peak_rss_growth_mb"], 1e-3),
            2,
        ),
        "command": "python benchmarks/embed_throughput.py " + " ".join(argv or sys.argv[1:]),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
