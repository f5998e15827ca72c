"""Fitting (or refining) the generation heads of an export on cached embeddings.

The training stages train the heads jointly (``gen_<target>`` terms of align and finetune,
:mod:`jobs.training.stage`). This is the cheap path beside them: the export's encoders are
frozen, every train row is embedded once (each modality, the shared space), and the heads
alone are trained with the same flow-matching objective on (condition, target) pairs drawn
from the cache, every other present modality of a row being a condition of its targets. It
adds heads to an export that has none (``generation`` section given here) or refines
existing ones, and writes a new export directory.

    python -m jobs.fit_generation --export RUN/export --shards DATA_prepared --out RUN/export_gen \
        [--steps 3000] [--batch 256] [--lr 1e-3] [--targets image audio ...] [--hidden 256]
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _every_target() -> dict[str, Any]:
    from models.generation import generation_targets

    return {"targets": generation_targets()}


@dataclass
class FitGenerationConfig:
    """Settings of :func:`fit_generation_heads`.

    Attributes:
        steps: Optimizer steps (every target each step).
        batch: (condition, target) pairs per target per step.
        lr: Peak AdamW learning rate (cosine decay, 50 warm-up steps).
        weight_decay: AdamW weight decay.
        max_rows: Train rows embedded (None: all).
        seed: Seed of the pair sampling and of the flow draws.
        generation: The ``generation`` section for an export that has none (ignored when
            the export already has heads, which are then refined); default: a head for
            every modality with a generation space.
        log_every: Steps between progress lines.
        cache: A file for the embedded train split (written once, reused when it exists:
            iterating on the heads skips the encoder pass). None: no cache.
    """

    steps: int = 3000
    batch: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_rows: int | None = None
    seed: int = 0
    generation: dict[str, Any] = field(default_factory=_every_target)
    log_every: int = 250
    cache: str | None = None


def _print(msg: str) -> None:
    print(msg, flush=True)


def _embed_split(model: Any, data: Any, batch_size: int = 128) -> dict[str, torch.Tensor]:
    """``{m: (N, E)}`` embeddings (zeros where a row lacks ``m``) of every modality."""
    from models.data import collate

    n = len(data)
    out = {}
    with torch.inference_mode():
        for m in model.modalities:
            col = data.tensors.get(m)
            if col is None:
                continue
            idx = [i for i in range(n) if col[i] is not None]
            if not idx:
                continue
            e = torch.zeros(n, model.config.embed_dim)
            for k in range(0, len(idx), batch_size):
                rows = idx[k : k + batch_size]
                b = collate([{m: col[i]} for i in rows], modalities=(m,))
                e[rows] = model.encode_features(m, b).embed.float()
            out[m] = e
    return out


def fit_generation_heads(
    export_dir: str | Path,
    shards_dir: str | Path,
    out_dir: str | Path,
    cfg: FitGenerationConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Trains the export's generation heads on cached train-split embeddings.

    ``log`` receives the progress lines (every ``cfg.log_every`` steps).

    Returns:
        ``{"steps", "seconds", "loss": {target: [first, last]}, "out"}``; the new export is
        written to ``out_dir`` (a copy of ``export_dir`` with the heads and the config's
        ``generation`` section).
    """
    from jobs.evaluation.data import load_split
    from jobs.exports import load_export
    from models.config import OmniConfig
    from models.data import collate
    from models.generation import build_generators

    cfg = cfg or FitGenerationConfig()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    ex = load_export(export_dir)
    model = ex.model
    if not len(model.generators):
        data = model.config.to_dict()
        data["generation"] = dict(cfg.generation)
        new_cfg = OmniConfig.from_dict(data)
        model.config = new_cfg
        model.generators = torch.nn.ModuleDict(build_generators(new_cfg, model.modalities))
    train = load_split(str(shards_dir), "train", cfg.max_rows)
    t0 = time.perf_counter()
    model.eval()
    cache = Path(cfg.cache) if cfg.cache else None
    if cache is not None and cache.is_file():
        emb = torch.load(cache, weights_only=True)  # plain tensors, no pickled objects
        if set(emb) - set(model.modalities) or any(len(e) != len(train) for e in emb.values()):
            raise ValueError(f"{cache} does not match this export and split; delete it")
    else:
        emb = _embed_split(model, train)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(emb, cache)
    present = {m: torch.tensor([x is not None for x in train.tensors[m]]) for m in emb}  # (N,) each
    data_space: dict[str, tuple[torch.Tensor, torch.Tensor, np.ndarray]] = {}
    for m, head in model.generators.items():
        idx = [i for i, x in enumerate(train.tensors.get(m, [])) if x is not None]
        if not idx:
            continue
        xs, ws = [], []
        for k in range(0, len(idx), 256):
            b = collate([{m: train.tensors[m][i]} for i in idx[k : k + 256]], modalities=(m,))
            x, w = head.space.from_batch(b[m], b.get(f"{m}_mask"))
            xs.append(x)
            ws.append(w)
        data_space[m] = (torch.cat(xs), torch.cat(ws), np.asarray(idx))
    # (row, source) pairs per target: every other present modality of the row.
    pairs: dict[str, list[tuple[int, str]]] = {}
    for m, (_, _, idx) in data_space.items():
        pos = {int(r): j for j, r in enumerate(idx)}
        pairs[m] = [
            (pos[int(r)], s) for r in idx for s in emb if s != m and bool(present[s][int(r)])
        ]
    row_of = {m: data_space[m][2] for m in data_space}
    embed_s = time.perf_counter() - t0
    heads = model.generators
    for p in model.parameters():
        p.requires_grad_(False)
    for p in heads.parameters():
        p.requires_grad_(True)
    heads.train()
    opt = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < 50:
            return cfg.lr * (step + 1) / 50
        frac = (step - 50) / max(1, cfg.steps - 50)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * frac))

    from models.objectives import flow_matching_loss

    hist: dict[str, list[float]] = {m: [] for m in pairs}
    t1 = time.perf_counter()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        total = 0.0
        losses = {}
        for m, pm in pairs.items():
            if not pm:
                continue
            pick = rng.integers(0, len(pm), cfg.batch)
            j = torch.as_tensor([pm[k][0] for k in pick])
            rows = torch.as_tensor(row_of[m][j.numpy()])
            cond = torch.stack([emb[pm[k][1]][int(r)] for k, r in zip(pick, rows, strict=True)])
            x, w, _ = data_space[m]
            fo = heads[m].flow_output(x[j], w[j], cond, torch.ones(len(j), dtype=torch.bool))
            losses[m] = flow_matching_loss(fo)
            total = total + losses[m]
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        for m, v in losses.items():
            hist[m].append(float(v.detach()))
        if cfg.log_every and (step % cfg.log_every == 0 or step == cfg.steps - 1):
            msg = " ".join(f"{m}={np.mean(hist[m][-50:]):.4f}" for m in hist)
            (log or _print)(f"[fit_generation] step {step}/{cfg.steps} {msg}")
    heads.eval()
    out_dir = Path(out_dir)
    if out_dir.resolve() != Path(export_dir).resolve():
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.copytree(export_dir, out_dir)
    model.save_pretrained(out_dir)
    return {
        "steps": cfg.steps,
        "embed_seconds": round(embed_s, 2),
        "train_seconds": round(time.perf_counter() - t1, 2),
        "train_rows": len(train),
        "pairs": {m: len(p) for m, p in pairs.items()},
        "loss": {
            m: [round(h[0], 4), round(float(np.mean(h[-50:])), 4)] for m, h in hist.items() if h
        },
        "out": str(out_dir),
    }
