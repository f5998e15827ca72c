"""In-process probe of a training recipe: (pretrain +) finetune on prepared shards, test accuracy.

The model (``model_config_from_data``), the objective (``StageObjective``) and the LR
schedule of ``jobs.train``, in one process without Ray/DeepSpeed (AdamW, grad clip, random
batches of ``--bs`` rows ~ 2 workers x data.batch_size), so a recipe can be compared in
minutes on a busy 2-core machine before a README-path run. Prints ``EVAL step acc`` every
``--eval-every`` finetune steps (classifier head of the first modality) and ``RESULT``.

    .venv/bin/python benchmarks/recipe_probe.py SHARDS --config configs/train/small_labelled.yaml \
        --pre 200 --ft 600 --eval-every 200 -o finetune.label_smoothing=0.1

Used for benchmarks/results/small_labelled_recipe.json.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np
import pyarrow.parquet as pq
import torch

from jobs.training.config import load_train_config
from jobs.training.data import inspect_shards
from jobs.training.engine import build_stage_model
from jobs.training.runner import model_config_from_data
from jobs.training.schedule import build_scheduler
from jobs.training.stage import StageObjective
from pipelines.schema import unpack_table

ap = argparse.ArgumentParser()
ap.add_argument("shards")
ap.add_argument("--config", default="configs/train/demo_small.yaml")
ap.add_argument("--pre", type=int, default=0)
ap.add_argument("--ft", type=int, default=120)
ap.add_argument("--bs", type=int, default=32)
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("-o", action="append", default=[])
ap.add_argument("--eval-every", type=int, default=0)
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
tc = load_train_config(a.config, [f"data.shards_dir={a.shards}", "align.pairs=null", *a.o])
info = inspect_shards(a.shards)
mods = info.modalities
mc = model_config_from_data(tc, a.shards, info, mods)
model = build_stage_model(mc.to_dict())
print(
    "params",
    sum(p.numel() for p in model.parameters()) / 1e6,
    "M",
    {m: getattr(mc, "encoders", {}) for m in []},
)


def load(split):
    t = pq.ParquetDataset(f"{a.shards}/{split}").read()
    cols = unpack_table(t, mods)
    n = len(cols["id"])
    return [
        {"id": cols["id"][i], "label": cols["label"][i], **{m: cols[m][i] for m in mods}}
        for i in range(n)
    ]


train, test = load("train"), load("test")
rng = np.random.default_rng(0)


def evaluate():
    model.eval()
    correct = 0
    obj = StageObjective(
        "finetune", tc.finetune, modalities=mods, label_names=info.label_names, pairs=[], seed=0
    )
    with torch.no_grad():
        for i in range(0, len(test), 128):
            b = obj.collate(test[i : i + 128], info.label_names)
            out = model(b, modalities=mods)
            correct += int((out.modality_logits[mods[0]].argmax(-1) == b["label"]).sum())
    return correct / len(test)


def run(stage, steps):
    st = tc.stage(stage)
    obj = StageObjective(stage, st, modalities=mods, label_names=info.label_names, pairs=[], seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=st.lr, weight_decay=st.weight_decay)
    sch = build_scheduler(
        opt, warmup_steps=st.warmup_steps, total_steps=steps, min_lr_ratio=st.min_lr_ratio
    )
    model.train()
    t0 = time.time()
    for step in range(steps):
        idx = rng.choice(len(train), a.bs, replace=False)
        batch = obj.collate([train[i] for i in idx], info.label_names)
        terms, _ = obj(model, batch, step=step)
        opt.zero_grad()
        terms["loss"].backward()
        if st.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, st.grad_clip)
        opt.step()
        sch.step()
        if step % 50 == 0 or step == steps - 1:
            print(
                stage,
                step,
                round(float(terms["loss"].detach()), 4),
                round(time.time() - t0, 1),
                flush=True,
            )
        if stage == "finetune" and a.eval_every and (step + 1) % a.eval_every == 0:
            print("EVAL", step + 1, evaluate(), flush=True)
            model.train()


if a.pre:
    run("pretrain", a.pre)
run("finetune", a.ft)
print("RESULT acc", evaluate(), a.o, "pre", a.pre, "ft", a.ft)
