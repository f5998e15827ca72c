"""Benchmark: how long ``jobs.evaluate`` takes, phase by phase, and how the metrics scale.

Builds a synthetic split (random featurized tensors of INTERFACES §1 shapes, 10 labels,
all six modalities) and an untrained export of the chosen size, runs
:func:`jobs.evaluation.run.run_evaluation` on it, and times the retrieval metric alone on larger
galleries. With ``--compare-cpu`` on a GPU machine it also runs on CPU and reports the
largest difference between the two runs' metrics. Prints a summary and writes
``benchmarks/results/evaluate.json`` (or ``--out``).

    .venv/bin/python benchmarks/evaluate_bench.py [--rows 1000] [--size tiny] [--device cpu]
        [--batch-size 64] [--gallery 2000 10000] [--compare-cpu] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.config import save_yaml  # noqa: E402
from jobs.evaluation import metrics as M  # noqa: E402
from jobs.evaluation.config import EvalConfig  # noqa: E402
from jobs.evaluation.run import run_evaluation  # noqa: E402
from pipelines.schema import MODALITIES, pack_tensors, shard_schema  # noqa: E402

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def build_split(root: Path, rows: int, seed: int = 0) -> Path:
    """Synthetic shards dir with a ``test`` split of ``rows`` rows (every 5th lacks audio)."""
    from pipelines.config import DataConfig
    from pipelines.featurize import get_featurizer
    from pipelines.tokenizer import train_tokenizer

    shards = root / "shards"
    texts = [f"{t} {w}" for w in WORDS for t in ("the digit", "a handwritten", "")]
    train_tokenizer(texts * 4, shards / "tokenizer", vocab_size=300)
    save_yaml(DataConfig(), shards / "data_config.yaml")
    text = get_featurizer("text", DataConfig().features, tokenizer_dir=shards / "tokenizer")
    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {m: [] for m in MODALITIES}
    ids, labels = [], []
    for i in range(rows):
        lab = i % 10
        ids.append(f"b-{i:06d}")
        labels.append(str(lab))
        cols["text"].append(text.from_text(f"the digit {WORDS[lab]}"))
        cols["image"].append(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        cols["audio"].append(None if i % 5 == 4 else rng.normal(size=(128, 40)).astype(np.float16))
        cols["video"].append(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
        cols["pointcloud"].append(rng.normal(size=(256, 3)).astype(np.float16))
        cols["signal"].append(rng.normal(size=(3, 128)).astype(np.float16))
    arrays = {
        "id": pa.array(ids),
        "label": pa.array(labels),
        "group": pa.array(ids),
        "modalities": pa.array(
            [[m for m in MODALITIES if cols[m][i] is not None] for i in range(rows)],
            type=pa.list_(pa.string()),
        ),
    }
    for m in MODALITIES:
        arrays[m], arrays[f"{m}_shape"] = pack_tensors(m, cols[m])
    schema = shard_schema()
    (shards / "test").mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table([arrays[f.name] for f in schema], schema=schema),
        shards / "test" / "part-00000.parquet",
    )
    return shards


def build_export(root: Path, shards: Path, size: str) -> Path:
    """Untrained export of model size ``size`` with 10 classes and text-x aligned pairs."""
    import shutil

    from models import OmniConfig, build_model

    export = root / f"export_{size}"
    model = build_model(OmniConfig.from_name(size, vocab_size=300, num_classes=10))
    model.save_pretrained(export)
    shutil.copytree(shards / "tokenizer", export / "tokenizer")
    shutil.copy2(shards / "data_config.yaml", export / "data_config.yaml")
    (export / "metrics.json").write_text("{}")
    info = {
        "aligned_pairs": [["text", m] for m in MODALITIES if m != "text"],
        "label_names": [str(i) for i in range(10)],
    }
    (export / "training.yaml").write_text(yaml.safe_dump(info))
    return export


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, float):
            out[key] = v
    return out


def run_once(export: Path, shards: Path, out: Path, device: str, batch_size: int) -> dict:
    cfg = EvalConfig(device=device, batch_size=batch_size, merge_into_export=False)
    t0 = time.perf_counter()
    res = run_evaluation(export, shards, cfg, out)
    wall = time.perf_counter() - t0
    n_items = sum(res["rows_per_modality"].values())
    return {
        "device": device,
        "wall_s": round(wall, 3),
        "timings_s": res["timings_s"],
        "items_embedded": n_items,
        # Embedding happens in the fusion pass (rows with every fused modality) and the
        # per-modality pass (the rest); each item is encoded once.
        "embed_items_per_s": round(
            n_items / max(res["timings_s"]["fusion"] + res["timings_s"]["embed"], 1e-9), 1
        ),
        "pairs": len(res["retrieval"]),
        "result": res,
    }


def retrieval_scaling(galleries: list[int], dim: int = 128) -> list[dict]:
    """Time the retrieval metric alone (numpy, CPU) at growing gallery sizes."""
    rng = np.random.default_rng(0)
    rows = []
    for n in galleries:
        q = rng.normal(size=(n, dim)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        g = q + 0.5 * rng.normal(size=(n, dim)).astype(np.float32)
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        labels = [str(i % 10) for i in range(n)]
        t0 = time.perf_counter()
        res = M.retrieval_metrics(q, g, labels, ks=(1, 5, 10))
        dt = time.perf_counter() - t0
        rows.append(
            {
                "gallery": n,
                "dim": dim,
                "seconds": round(dt, 3),
                "queries_per_s": round(n / dt, 1),
                "instance_R@1": round(res["instance"]["R@1"], 4),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--size", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--gallery", type=int, nargs="*", default=[2000, 10000])
    p.add_argument("--compare-cpu", action="store_true")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/evaluate.json")
    args = p.parse_args(argv)

    import torch

    report: dict = {
        "benchmark": "evaluate",
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "rows": args.rows,
        "model_size": args.size,
        "batch_size": args.batch_size,
    }
    with tempfile.TemporaryDirectory(prefix="evalbench_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        shards = build_split(root, args.rows)
        export = build_export(root, shards, args.size)
        report["setup_s"] = round(time.perf_counter() - t0, 2)
        main_run = run_once(export, shards, root / "out", args.device, args.batch_size)
        res = main_run.pop("result")
        report["run"] = main_run
        report["headline"] = {
            "mean_R@1_all_pairs": float(
                np.mean([M.headline_r1(v) for v in res["retrieval"].values() if "skipped" not in v])
            ),
            "fusion_gain": res["fusion"].get("fusion_gain"),
            "emergent_mean_R@1": res["emergent_alignment"].get("mean_R@1"),
        }
        if args.compare_cpu and args.device != "cpu":
            cpu_run = run_once(export, shards, root / "out_cpu", "cpu", args.batch_size)
            cpu_res = cpu_run.pop("result")
            report["cpu_run"] = cpu_run
            a = _flatten({k: res[k] for k in ("retrieval", "zero_shot", "fusion")})
            b = _flatten({k: cpu_res[k] for k in ("retrieval", "zero_shot", "fusion")})
            diffs = {k: abs(a[k] - b[k]) for k in a if k in b}
            worst = max(diffs, key=diffs.get) if diffs else None
            report["cpu_vs_device"] = {
                "metrics_compared": len(diffs),
                "max_abs_diff": diffs[worst] if worst else 0.0,
                "worst_metric": worst,
                "n_differing_gt_1e-6": sum(v > 1e-6 for v in diffs.values()),
            }
    report["retrieval_scaling"] = retrieval_scaling(args.gallery)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    r = report["run"]
    print(
        f"evaluate on {args.rows} rows, model {args.size}, device {args.device}: "
        f"wall {r['wall_s']:.2f}s, {r['pairs']} pairs, embed {r['embed_items_per_s']:.0f} items/s"
    )
    print("  phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in r["timings_s"].items()))
    if "cpu_vs_device" in report:
        c = report["cpu_vs_device"]
        print(
            f"  cpu vs {args.device}: max |diff| {c['max_abs_diff']:.2e} ({c['worst_metric']}) "
            f"over {c['metrics_compared']} metrics; cpu wall {report['cpu_run']['wall_s']:.2f}s"
        )
    for row in report["retrieval_scaling"]:
        print(
            f"  retrieval metric, gallery {row['gallery']}: {row['seconds']:.2f}s "
            f"({row['queries_per_s']:.0f} queries/s)"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
