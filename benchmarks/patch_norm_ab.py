"""A/B of patch-target normalization (``<stage>.norm_pix_targets``) on synthetic shards.

Trains the same model from the same seed through ``pretrain`` then ``align`` with the
training loop's own stage objective (``jobs.training.stage.StageObjective``), once with raw
patch targets and once with per-patch normalized ones (MAE's ``norm_pix_loss``), in one
process (plain AdamW loop, no Ray, no DeepSpeed), then measures label-level cross-modal
retrieval R@1 on the held-out split.

    python -m benchmarks.patch_norm_ab [--steps 40] [--rows 240] [--out results.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from itertools import permutations
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def _batches(samples: list[dict[str, Any]], bsz: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randperm(len(samples), generator=g)[:bsz].tolist()
        yield [samples[i] for i in idx]


@torch.no_grad()
def _retrieval_r1(model: torch.nn.Module, obj: Any, samples: list[dict[str, Any]]) -> dict:
    """Label-level R@1 of every ordered modality pair over rows having both."""
    model.eval()
    batch = obj.collate(samples, obj.label_names)
    mods = [m for m in obj.modalities if m in batch]
    out = model(batch, modalities=mods)
    labels = batch["label"]
    res: dict[str, float] = {}
    for a, b in permutations(mods, 2):
        rows = out.present[a] & out.present[b] & (labels >= 0)
        if int(rows.sum()) < 2:
            continue
        sims = out.embeds[a][rows].float() @ out.embeds[b][rows].float().t()
        lab = labels[rows]
        res[f"{a}->{b}"] = float((lab[sims.argmax(1)] == lab).float().mean())
    model.train()
    return res


def run_one(norm: bool, shards: str, info: Any, tc: Any, steps: int, seed: int) -> dict:
    import pyarrow.parquet as pq

    from jobs.training.data import table_to_samples
    from jobs.training.engine import build_stage_model
    from jobs.training.runner import aligned_pairs, model_config_from_data
    from jobs.training.stage import StageObjective

    mods = info.modalities
    train = table_to_samples(pq.read_table(f"{shards}/train"), mods)
    held = table_to_samples(pq.read_table(f"{shards}/test"), mods)
    torch.manual_seed(seed)
    model = build_stage_model(model_config_from_data(tc, shards, info, mods).to_dict())
    model.train()
    log: dict[str, Any] = {"norm_pix_targets": norm}
    for stage in ("pretrain", "align"):
        st = dataclasses.replace(tc.stage(stage), norm_pix_targets=norm)
        obj = StageObjective(
            stage,
            st,
            modalities=mods,
            label_names=info.label_names,
            pairs=aligned_pairs(tc, mods),
            seed=seed,
        )
        for p in model.parameters():
            p.requires_grad_(True)
        obj.freeze_unused(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=st.lr)
        losses = []
        for step, rows in enumerate(_batches(train, tc.data.batch_size, steps, seed)):
            terms, _ = obj(model, obj.collate(rows, info.label_names), step=step)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            losses.append(float(terms["loss"].detach()))
        log[f"{stage}_loss_first_last"] = [losses[0], losses[-1]]
    r1 = _retrieval_r1(model, obj, held)
    log["retrieval_r1"] = r1
    log["mean_r1"] = sum(r1.values()) / max(1, len(r1))
    return log


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per stage")
    ap.add_argument("--rows", type=int, default=240, help="synthetic rows (all splits)")
    ap.add_argument("--seeds", type=int, default=1, help="repeat over seeds 0..N-1")
    ap.add_argument("--config", default=str(ROOT / "configs/train/tiny.yaml"))
    ap.add_argument("--out", default=None, help="write the JSON here too")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from jobs.training.config import load_train_config
    from jobs.training.data import inspect_shards
    from jobs.training.synthetic import write_synthetic_shards

    t0 = time.time()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_synthetic_shards(f"{tmp}/shards", n=args.rows, seed=0)
        info = inspect_shards(shards)
        tc = load_train_config(args.config, [f"data.shards_dir={shards}"])
        for seed in range(args.seeds):
            for norm in (False, True):
                runs.append({"seed": seed, **run_one(norm, shards, info, tc, args.steps, seed)})
    summary = {
        str(norm): sum(r["mean_r1"] for r in runs if r["norm_pix_targets"] is norm)
        / max(1, args.seeds)
        for norm in (False, True)
    }
    result = {
        "what": "label-level cross-modal R@1 (test split) after pretrain+align, "
        "raw vs per-patch normalized reconstruction targets",
        "steps_per_stage": args.steps,
        "rows": args.rows,
        "config": args.config,
        "mean_r1_by_norm_pix_targets": summary,
        "runs": runs,
        "seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
