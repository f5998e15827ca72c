"""Representation-collapse check of a training run, stage by stage.

For each finished stage of a run (``runs/<name>/<stage>/final``) embeds the first rows of a
prepared split and reports, per modality, the mean pairwise cosine similarity of the
embeddings (1.0 = every input maps to the same vector: collapsed; ~0 = spread out) and the
mean cross-batch standard deviation. Prints and writes JSON.

    python benchmarks/embedding_health.py --run runs/demo --data data/omnidigits_prepared
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow.parquet as pq
import torch

from models.data import collate
from models.model import OmniModel
from pipelines.schema import MODALITIES, unpack_table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="run dir (runs/<name>)")
    p.add_argument("--data", type=Path, required=True, help="prepared shards dir")
    p.add_argument("--split", default="test")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/embedding_health.json"))
    args = p.parse_args()

    torch.set_num_threads(1)
    cols = unpack_table(pq.read_table(args.data / args.split))
    labels = sorted({lab for lab in cols["label"] if lab})
    n = min(args.rows, len(cols["id"]))
    mods = [m for m in MODALITIES if m in cols]
    samples = [{**{m: cols[m][i] for m in mods}, "label": cols["label"][i]} for i in range(n)]
    batch = collate(samples, modalities=mods, label_names=labels)
    result: dict = {"run": str(args.run), "split": args.split, "rows": n, "stages": {}}
    for stage in ("pretrain", "align", "finetune"):
        ckpt = args.run / stage / "final"
        if not (ckpt / "model.safetensors").is_file():
            continue
        model = OmniModel.from_pretrained(ckpt).eval()
        with torch.no_grad():
            out = model(batch, modalities=mods)
        per: dict = {}
        for m in mods:
            e = out.embeds[m][out.present[m]]  # (n_m, E), L2-normalized
            k = e.shape[0]
            if k < 2:
                continue
            cos = e @ e.t()
            per[m] = {
                "mean_pairwise_cosine": round(float((cos.sum() - k) / (k * k - k)), 4),
                "cross_batch_std": round(float(e.std(0).mean()), 4),
            }
        result["stages"][stage] = per
        print(stage, {m: v["mean_pairwise_cosine"] for m, v in per.items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
