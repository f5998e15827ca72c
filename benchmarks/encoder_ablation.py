"""Why does a modality lag? Trains one modality's branch alone (encoder -> trunk -> head,
cross-entropy on the label) from scratch for a fixed number of steps, for several encoder
variants, and scores the test split: isolates the encoder (capacity, resolution, stem) from
the multi-task recipe of the demo.

    python -m benchmarks.encoder_ablation --data data/omnidigits_prepared \
        --model-config runs/demo/model_config.yaml --modality video \
        --variant patch=16 --variant patch=8 --steps 300

Each ``--variant`` is comma-separated ``key=value`` overrides of ``encoders.<modality>``
(``default`` = the run's). Writes ``benchmarks/results/encoder_ablation_<modality>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _parse_variant(text: str) -> dict[str, Any]:
    if text == "default":
        return {}
    out: dict[str, Any] = {}
    for kv in text.split(","):
        k, v = kv.split("=", 1)
        out[k] = int(v) if v.lstrip("-").isdigit() else v
    return out


def run_variant(
    base: dict[str, Any],
    modality: str,
    overrides: dict[str, Any],
    train,
    test,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from models import OmniConfig, build_model
    from models.data import collate

    torch.manual_seed(seed)
    cfg = dict(base)
    cfg["modalities"] = [modality]
    cfg["encoders"] = {
        **{k: v for k, v in base["encoders"].items() if k == modality},
        modality: {**base["encoders"][modality], **overrides},
    }
    model = build_model(OmniConfig.from_dict(cfg))
    names = sorted({x for x in train.labels if x is not None})
    tr = [i for i in train.rows_with([modality]) if train.labels[i] is not None]
    te = [i for i in test.rows_with([modality]) if test.labels[i] is not None]

    def batch(split, rows):
        samples = [{modality: split.tensors[modality][i], "label": split.labels[i]} for i in rows]
        return collate(samples, modalities=[modality], label_names=names)

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    model.train()
    for _ in range(steps):
        b = batch(train, rng.choice(tr, batch_size, replace=False))
        out = model(b, modalities=[modality], parts=("classifier",))
        loss = F.cross_entropy(out.modality_logits[modality], b["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    train_s = time.perf_counter() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(te), 64):
            b = batch(test, te[s : s + 64])
            out = model(b, modalities=[modality], parts=("classifier",))
            correct += int((out.modality_logits[modality].argmax(1) == b["label"]).sum())
    n_params = sum(p.numel() for n, p in model.named_parameters() if f"encoders.{modality}" in n)
    return {
        "overrides": overrides,
        "test_accuracy": round(correct / max(1, len(te)), 4),
        "final_train_loss": round(float(loss.detach()), 4),
        "encoder_params": n_params,
        "train_s": round(train_s, 1),
        "n_train": len(tr),
        "n_test": len(te),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.encoder_ablation")
    p.add_argument("--data", required=True)
    p.add_argument("--model-config", required=True, type=Path)
    p.add_argument("--modality", required=True)
    p.add_argument("--variant", action="append", default=None)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    import torch
    import yaml

    from jobs.evaluation.data import load_split

    torch.set_num_threads(args.threads)
    base = yaml.safe_load(args.model_config.read_text())
    train, test = load_split(args.data, "train"), load_split(args.data, "test")
    results = []
    for v in args.variant or ["default"]:
        r = run_variant(
            base,
            args.modality,
            _parse_variant(v),
            train,
            test,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
        )
        results.append(r)
        print(json.dumps(r), flush=True)
    out = args.out or ROOT / "benchmarks" / "results" / f"encoder_ablation_{args.modality}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"modality": args.modality, "steps": args.steps, "batch_size": args.batch_size,
             "lr": args.lr, "data": args.data, "results": results},
            indent=2,
        )
    )  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
