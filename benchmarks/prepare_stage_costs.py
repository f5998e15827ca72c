"""CPU cost per row of each prepare step at the realistic preset, without Ray.

Where ``benchmarks/prepare_throughput.py`` times the whole job on a local Ray (wall clock,
meaningful only on a quiet machine), this measures each step's CPU time (``process_time``,
which a busy shared machine disturbs far less) in one process on the same photo corpus:

* ``featurize``: the plain loop's work (read + JPEG decode + resize to 224), the reference;
* ``decode_rows``: stage 1 as the pipeline runs it (:class:`pipelines.stages.DecodeRows`:
  featurize + exact/near dedupe keys + the stage-1 Arrow block);
* ``finalize_route``: stage 2's per-block task (:func:`pipelines.stages.finalize_and_route`);
* ``write``: one shard's write task (:func:`pipelines.shards.write_group`: concatenate, sort by
  id, Parquet);
* ``read``: reading that shard back (:func:`pipelines.schema.read_shard`), what training pays.

``cpu_bound_efficiency`` = featurize / (decode_rows + finalize_route + write): the parallel
efficiency the whole job could reach with perfect scheduling and no start-up (the Ray part is
the rest of the gap).

Usage::

    .venv/bin/python benchmarks/prepare_stage_costs.py            # 512 photos
    .venv/bin/python benchmarks/prepare_stage_costs.py --rows 128 --out /tmp/x.json

The corpus is prepare_throughput's photo corpus (``data/realistic_photos``, built if missing).
Writes ``benchmarks/results/prepare_stage_costs.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--corpus", default=str(ROOT / "data/realistic_photos"))
    ap.add_argument("--block", type=int, default=128, help="rows per stage-1 block")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/prepare_stage_costs.json"))
    args = ap.parse_args()

    import pyarrow as pa

    from benchmarks.prepare_throughput import ensure_corpus, machine_load
    from common.config import to_dict
    from pipelines.config import load_data_config
    from pipelines.featurize import get_featurizer
    from pipelines.paths import PathResolver
    from pipelines.schema import read_shard
    from pipelines.shards import write_group
    from pipelines.stages import DecodeRows, finalize_and_route

    corpus = Path(args.corpus)
    manifest = ensure_corpus(corpus, args.rows, "realistic", 2)
    rows = [json.loads(ln) for ln in manifest.read_text().splitlines() if ln.strip()]
    rows = rows[: args.rows]
    cfg = load_data_config(ROOT / "configs/data/realistic.yaml")
    cd = to_dict(cfg)
    n = len(rows)
    load_before = machine_load()

    feat = get_featurizer("image", cfg.features)
    feat.warm_up()
    resolver = PathResolver(str(corpus), [])
    t = time.process_time()
    for r in rows:
        feat.decode(resolver.read(r["image"], cfg.features.max_file_bytes), ".jpg")
    cost = {"featurize": time.process_time() - t}

    dec = DecodeRows(cd, str(corpus), False, str(manifest))
    dec(pa.Table.from_pylist(rows[:4]))  # warm
    t = time.process_time()
    blocks = [dec(pa.Table.from_pylist(rows[i : i + args.block])) for i in range(0, n, args.block)]
    cost["decode_rows"] = time.process_time() - t

    plan = {
        "drop_rows": [],
        "drop_index": [],
        "drop_mods": {},
        "group_split": {r["id"]: "train" for r in rows},
        "num_shards": {"train": 1},
    }
    t = time.process_time()
    pieces = [finalize_and_route(b, [("train", 0)], cd, plan, None, 0) for b in blocks]
    cost["finalize_route"] = time.process_time() - t
    with tempfile.TemporaryDirectory() as out:
        t = time.process_time()
        w = write_group(out, {"train": 1}, *pieces)
        cost["write"] = time.process_time() - t
        path = Path(out) / w.column("file")[0].as_py()
        size = path.stat().st_size
        t = time.process_time()
        got = read_shard(path, ["image"])
        cost["read"] = time.process_time() - t
        assert len(got["id"]) == n and all(x.shape == (224, 224, 3) for x in got["image"])

    per_row = {k: round(v / n * 1e3, 3) for k, v in cost.items()}
    pipeline = per_row["decode_rows"] + per_row["finalize_route"] + per_row["write"]
    result = {
        "benchmark": "prepare_stage_costs",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": n,
        "corpus": str(corpus),
        "data_config": "configs/data/realistic.yaml",
        "cpu_ms_per_row": per_row,
        "pipeline_cpu_ms_per_row": round(pipeline, 3),
        "cpu_bound_efficiency": round(per_row["featurize"] / pipeline, 3),
        "shard_mb": round(size / 2**20, 1),
        "load_before": load_before,
        "load_after": machine_load(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("rows", "cpu_ms_per_row", "cpu_bound_efficiency")}))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
