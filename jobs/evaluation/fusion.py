"""Fusion gain: the classification head on fused modalities vs on the best single one.

Which rows and modalities the metric uses (:func:`fusion_plan`), the headline result
(:func:`fusion_result`) and the same comparison for every modality pair
(:func:`fusion_pairs`). Numpy in, numpy out; the forward passes are
:func:`jobs.evaluation.encode.head_logits`.
"""

from __future__ import annotations

import dataclasses
from itertools import combinations
from typing import Any

import numpy as np

from jobs.evaluation import metrics as M
from jobs.evaluation.config import EvalConfig
from jobs.evaluation.data import SplitData, TrainingInfo


def auto_fusion_modalities(data: SplitData, mods: list[str], min_rows: int) -> list[str] | None:
    """Largest modality set (>= 2) that at least ``min_rows`` labelled rows all have.

    Every subset of the (at most six) modalities is tried, in canonical order, so the
    choice is deterministic; among equally large sets the best supported wins.
    """
    present = {m: np.asarray([t is not None for t in data.tensors[m]]) for m in mods}
    labelled = np.asarray([x is not None for x in data.labels])
    best: tuple[int, int] | None = None
    chosen: tuple[str, ...] | None = None
    for size in range(2, len(mods) + 1):
        for combo in combinations(mods, size):
            support = int(np.logical_and.reduce([present[m] for m in combo] + [labelled]).sum())
            if support >= min_rows and (best is None or (size, support) > best):
                best, chosen = (size, support), combo
    return list(chosen) if chosen else None


def fusion_plan(
    model, data: SplitData, mods: list[str], info: TrainingInfo, cfg: EvalConfig
) -> dict[str, Any]:
    """Which rows and modalities the fusion-gain metric uses, or ``{"skipped": why}``."""
    from jobs.evaluation.encode import num_classes

    n_cls = num_classes(model)
    if n_cls <= 0:
        return {"skipped": "export has no classification head (num_classes = 0)"}
    names = cfg.label_names or info.label_names
    if not names:
        return {
            "skipped": "label names of the classification head are unknown "
            "(not in the export's training info; pass label_names=[...])"
        }
    if len(names) != n_cls:
        return {"skipped": f"{len(names)} label names but the head has {n_cls} classes"}
    if cfg.fusion_modalities:
        fmods = [m for m in cfg.fusion_modalities if m in mods]
        if len(fmods) < 2:
            return {
                "skipped": f"fusion_modalities {cfg.fusion_modalities} has fewer than "
                f"2 modalities present in the split and the model ({mods})"
            }
    else:
        fmods = auto_fusion_modalities(data, mods, cfg.min_fusion_rows)
        if fmods is None:
            return {
                "skipped": f"fewer than {cfg.min_fusion_rows} labelled rows share any "
                "2 or more modalities"
            }
    index = {n: i for i, n in enumerate(names)}
    rows = data.rows_with(fmods)
    rows = np.asarray([i for i in rows if data.labels[i] in index], dtype=np.int64)
    if len(rows) < cfg.min_fusion_rows:
        return {
            "skipped": f"only {len(rows)} rows have all of {fmods} and a known label "
            f"(min_fusion_rows={cfg.min_fusion_rows})"
        }
    targets = np.asarray([index[data.labels[i]] for i in rows])
    return {"modalities": fmods, "rows": rows, "targets": targets, "num_classes": n_cls}


def fusion_result(
    plan: dict[str, Any],
    fused_logits: np.ndarray,
    single_logits: dict[str, np.ndarray],
    cfg: EvalConfig,
) -> dict[str, Any]:
    """Head accuracy fused vs each single modality on the same rows."""
    fmods, targets = plan["modalities"], plan["targets"]
    fused = M.top1_accuracy(fused_logits, targets, cfg.tie_decimals)
    single = {
        m: M.top1_accuracy(single_logits[m], targets, cfg.tie_decimals)["accuracy"] for m in fmods
    }
    best = max(single, key=lambda m: (single[m], -fmods.index(m)))
    return {
        "modalities": fmods,
        "n": int(len(targets)),
        "fused_accuracy": fused["accuracy"],
        "single_accuracy": single,
        "best_single_modality": best,
        "best_single_accuracy": single[best],
        "fusion_gain": fused["accuracy"] - single[best],
        "chance": 1.0 / plan["num_classes"],
    }


def fusion_pairs(
    model, data: SplitData, mods: list[str], info: TrainingInfo, cfg: EvalConfig
) -> dict[str, Any]:
    """Fusion gain of every modality pair (rows having both): where one modality is already
    perfect on the all-modality rows, the headline gain hits the ceiling; pairs show whether
    fusing two imperfect modalities helps."""
    from jobs.evaluation.encode import head_logits

    per: dict[str, Any] = {}
    for a, b in combinations(mods, 2):
        plan = fusion_plan(
            model, data, mods, info, dataclasses.replace(cfg, fusion_modalities=[a, b])
        )
        if "skipped" in plan:
            continue
        _, f_logits, s_logits = head_logits(model, data, [a, b], plan["rows"], cfg.batch_size)
        r = fusion_result(plan, f_logits, s_logits, cfg)
        per[f"{a}+{b}"] = {
            k: r[k] for k in ("n", "fused_accuracy", "best_single_accuracy", "fusion_gain")
        }
    if not per:
        return {"skipped": f"no modality pair has {cfg.min_fusion_rows} labelled rows"}
    gains = [v["fusion_gain"] for v in per.values()]
    return {
        "pairs": per,
        "mean_gain": float(np.mean(gains)),
        "pairs_with_gain": int(sum(g > 0 for g in gains)),
        "pairs_with_loss": int(sum(g < 0 for g in gains)),
    }
