"""Evaluate an export on a prepared split: retrieval, zero-shot, fusion gain, emergent alignment.

    python -m jobs.evaluate --export DIR --data SHARDS_DIR [--split test] [--out DIR]
        [--config configs/eval/default.yaml] [--aligned-pairs text-image,text-audio] [key=value ...]

Runs unchanged under ``ray job submit --working-dir . -- python -m jobs.evaluate ...`` (the
test split is small: it is read with pyarrow and encoded in batches on the driver).

Writes ``<out>/metrics.json`` (default ``<export>/eval/<split>/``), merges the same results
under ``"evaluation" → <split>`` into ``<export>/metrics.json``, draws
``retrieval_r1.png``, ``embeddings_2d.png``, ``zero_shot.png`` and ``fusion.png``, and prints a
compact summary. A metric that cannot be computed (no text branch, no classification head,
modality absent from the split, ...) is recorded as ``{"skipped": "<reason>"}``; user errors
(missing export or split, corrupt config) exit with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from common.config import ConfigError, load_config
from jobs.evaluation import metrics as M
from jobs.evaluation.config import EvalConfig
from jobs.evaluation.data import (
    EvaluationError,
    SplitData,
    TrainingInfo,
    load_split,
    read_training_info,
)

EXIT_USER_ERROR = 2


def _pair_key(a: str, b: str) -> str:
    return f"{a}->{b}"


def _r1(entry: dict[str, Any]) -> float:
    """Headline R@1 of a retrieval entry: category-level when labels exist, else instance."""
    level = entry.get("category") or entry["instance"]
    return float(level["R@1"])


def _auto_fusion_modalities(data: SplitData, mods: list[str], min_rows: int) -> list[str] | None:
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


def _text_featurizer(export_dir: Path, data_dir: Path | None):
    """The export's text featurizer (tokenizer from ``<export>/tokenizer``)."""
    from jobs.evaluation.text import load_text_featurizer

    return load_text_featurizer(export_dir, data_dir)


def _zero_shot(
    model,
    export_dir: Path,
    data_dir: Path | None,
    data: SplitData,
    embeds: dict[str, tuple[np.ndarray, np.ndarray]],
    class_names: list[str],
    cfg: EvalConfig,
) -> dict[str, Any]:
    from jobs.evaluation.encode import embed_arrays, model_modalities

    if "text" not in model_modalities(model):
        return {"skipped": "the model has no text branch to embed label prompts"}
    if not class_names:
        return {"skipped": "no label names (split has no labels and export has none)"}
    try:
        featurizer = _text_featurizer(export_dir, data_dir)
    except EvaluationError as e:
        return {"skipped": f"cannot tokenize prompts: {e}"}
    prompts = [
        t.format(label=cfg.label_text.get(c, c)) for c in class_names for t in cfg.prompt_templates
    ]
    from pipelines.featurize import SampleError

    try:
        ids = [np.asarray(featurizer.from_text(p)) for p in prompts]
    except SampleError as e:
        return {"skipped": f"a label prompt cannot be tokenized ({e}); check prompt_templates"}
    emb = embed_arrays(model, "text", ids, cfg.batch_size)  # (C*T, E)
    cls = M.class_embeddings(emb.reshape(len(class_names), len(cfg.prompt_templates), -1))
    per_mod: dict[str, Any] = {}
    for m, (rows, e) in embeds.items():
        labels = [data.labels[i] for i in rows]
        res = M.zero_shot_accuracy(e, labels, cls, class_names, tie_decimals=cfg.tie_decimals)
        per_mod[m] = res if res["n"] else {"skipped": "no rows with a known class label"}
    if "accuracy" in per_mod.get("text", {}):
        # Text rows go through the same encoder as the prompts: not a cross-modal measure.
        per_mod["text"]["note"] = "text vs text prompts: caption/prompt agreement, not cross-modal"
    return {
        "per_modality": per_mod,
        "class_names": class_names,
        "templates": list(cfg.prompt_templates),
        "example_prompts": prompts[: len(cfg.prompt_templates)],
    }


def _fusion_plan(
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
        fmods = _auto_fusion_modalities(data, mods, cfg.min_fusion_rows)
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


def _fusion_result(
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


def _fusion_pairs(
    model, data: SplitData, mods: list[str], info: TrainingInfo, cfg: EvalConfig
) -> dict[str, Any]:
    """Fusion gain of every modality pair (rows having both): where one modality is already
    perfect on the all-modality rows, the headline gain hits the ceiling; pairs show whether
    fusing two imperfect modalities helps."""
    from jobs.evaluation.encode import head_logits

    per: dict[str, Any] = {}
    for a, b in combinations(mods, 2):
        plan = _fusion_plan(
            model, data, mods, info, dataclasses.replace(cfg, fusion_modalities=[a, b])
        )
        if "skipped" in plan:
            continue
        _, f_logits, s_logits = head_logits(model, data, [a, b], plan["rows"], cfg.batch_size)
        r = _fusion_result(plan, f_logits, s_logits, cfg)
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


def _emergent(
    retrieval: dict[str, Any], mods: list[str], aligned: list[list[str]] | None, source: str
) -> dict[str, Any]:
    if aligned is None:
        return {
            "skipped": "the export records no aligned modality pairs "
            "(pass --aligned-pairs a-b,c-d or aligned_pairs=[...])"
        }
    pairs = M.emergent_pairs(mods, aligned)
    measured = {
        _pair_key(a, b): _r1(retrieval[_pair_key(a, b)])
        for a, b in pairs
        if "skipped" not in retrieval.get(_pair_key(a, b), {"skipped": 1})
    }
    aligned_set = {frozenset(p) for p in aligned}
    aligned_r1 = [
        _r1(v)
        for k, v in retrieval.items()
        if "skipped" not in v and frozenset(k.split("->")) in aligned_set
    ]
    out: dict[str, Any] = {
        "aligned_pairs": sorted("-".join(sorted(p)) for p in aligned_set),
        "source": source,
        "emergent_pairs": [_pair_key(a, b) for a, b in pairs],
        "R@1": measured,
        "mean_R@1_aligned": float(np.mean(aligned_r1)) if aligned_r1 else None,
    }
    if not pairs:
        out["skipped"] = "every pair of modalities present was aligned in training"
    elif not measured:
        out["skipped"] = "no emergent pair has enough rows with both modalities"
    else:
        out["mean_R@1"] = float(np.mean(list(measured.values())))
    return out


def run_evaluation(
    export_dir: str | Path,
    data_dir: str | Path,
    cfg: EvalConfig,
    out_dir: str | Path | None = None,
    aligned_pairs: list[str] | None = None,
) -> dict[str, Any]:
    """Evaluates an export on one split and writes metrics.json and the plots.

    Args:
        export_dir: export of Contract 3.
        data_dir: shards dir of Contract 2.
        cfg: evaluation config (``cfg.split`` picks the split).
        out_dir: where metrics.json and PNGs go (default ``<export>/eval/<split>``).
        aligned_pairs: overrides the export's training info, e.g. ``["text-image"]``.

    Returns:
        The metrics dict written to ``<out>/metrics.json``.

    Raises:
        EvaluationError: user errors (bad paths, split, export).
    """
    from jobs.evaluation.encode import (
        check_export,
        embed_rows,
        head_logits,
        load_model,
        model_modalities,
    )

    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 4)
        return now

    export_dir = check_export(export_dir)
    data_loc = str(data_dir)  # a local path or a URI (read through pyarrow.fs)
    data_dir = Path(data_dir) if "://" not in data_loc else None
    out_dir = Path(out_dir) if out_dir else export_dir / "eval" / cfg.split
    info = read_training_info(export_dir)
    # Resolve user-given pairs before any heavy work so that a typo fails fast.
    if aligned_pairs is not None:
        aligned, source = _parse_pairs(aligned_pairs), "command line"
    elif cfg.aligned_pairs is not None:
        aligned, source = _parse_pairs(cfg.aligned_pairs), "config"
    else:
        aligned, source = info.aligned_pairs, info.source.get("aligned_pairs", "")
    data = load_split(data_loc, cfg.split, cfg.max_rows)
    t = lap("load_split", t0)
    model = load_model(export_dir, cfg.device)
    t = lap("load_model", t)

    model_mods = model_modalities(model)
    split_mods = data.modalities
    mods = [m for m in split_mods if m in model_mods]
    skipped: dict[str, str] = {}
    for m in split_mods:
        if m not in model_mods:
            skipped[f"modality:{m}"] = "in the split but the model has no branch for it"
    for m in model_mods:
        if m not in split_mods:
            skipped[f"modality:{m}"] = f"the model has it but split {cfg.split!r} has no rows"
    if not mods:
        raise EvaluationError(
            f"no modality in common between split {cfg.split!r} ({split_mods}) "
            f"and the model ({model_mods})"
        )

    # One pass over the fusion rows gives their per-modality embeddings and the head's
    # fused and single-modality logits; a second pass embeds the remaining rows only, so
    # no row is encoded twice.
    plan = _fusion_plan(model, data, mods, info, cfg)
    done: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    fusion: dict[str, Any] = {k: v for k, v in plan.items() if k == "skipped"}
    if "skipped" not in plan:
        f_emb, f_logits, s_logits = head_logits(
            model, data, plan["modalities"], plan["rows"], cfg.batch_size
        )
        done = {m: (plan["rows"], e) for m, e in f_emb.items()}
        fusion = _fusion_result(plan, f_logits, s_logits, cfg)
        fusion["pairwise"] = _fusion_pairs(model, data, mods, info, cfg)
    t = lap("fusion", t)
    # Per-modality embeddings: (sorted row indices (n,), embeddings (n, E)).
    embeds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for m in mods:
        rows = data.rows_with([m])
        have_rows, have_emb = done.get(m, (np.zeros(0, np.int64), None))
        todo = np.setdiff1d(rows, have_rows)
        new = embed_rows(model, data, m, todo, cfg.batch_size) if len(todo) else None
        parts = [(r, e) for r, e in ((have_rows, have_emb), (todo, new)) if e is not None]
        all_rows = np.concatenate([r for r, _ in parts])
        order = np.argsort(all_rows, kind="stable")
        embeds[m] = (all_rows[order], np.concatenate([e for _, e in parts])[order])
    t = lap("embed", t)

    has_labels = any(x is not None for x in data.labels)
    retrieval: dict[str, Any] = {}
    for a, b in M.ordered_pairs(mods):
        rows = data.rows_with([a, b])
        key = _pair_key(a, b)
        if len(rows) < cfg.min_retrieval_rows:
            retrieval[key] = {"skipped": f"only {len(rows)} rows have both {a} and {b}"}
            continue
        pos_a = np.searchsorted(embeds[a][0], rows)
        pos_b = np.searchsorted(embeds[b][0], rows)
        retrieval[key] = M.retrieval_metrics(
            embeds[a][1][pos_a],
            embeds[b][1][pos_b],
            [data.labels[i] for i in rows] if has_labels else None,
            ks=cfg.ks,
            tie_decimals=cfg.tie_decimals,
        )

    t = lap("retrieval", t)
    class_names = (
        cfg.label_names or info.label_names or sorted({x for x in data.labels if x is not None})
    )
    zero_shot = _zero_shot(model, export_dir, data_dir, data, embeds, class_names, cfg)
    t = lap("zero_shot", t)
    emergent = _emergent(retrieval, mods, aligned, source)
    r1 = {k: round(_r1(v), 4) for k, v in retrieval.items() if "skipped" not in v}
    mean_r1 = float(np.mean(list(r1.values()))) if r1 else None

    result: dict[str, Any] = {
        "split": cfg.split,
        "export": str(export_dir),
        "data": data_loc,
        "n_rows": len(data),
        "modalities": mods,
        "rows_per_modality": {m: int(len(embeds[m][0])) for m in mods},
        "retrieval_level": "category" if has_labels else "instance",
        "retrieval": retrieval,
        "zero_shot": zero_shot,
        "fusion": fusion,
        "emergent_alignment": emergent,
        # Compact headline views (reports, jobs.demo); the full numbers are above.
        "mean_R@1": mean_r1,
        "retrieval_summary": {"level": "category" if has_labels else "instance", "R@1": r1},
        "emergent": {
            k: emergent[k] for k in ("mean_R@1", "mean_R@1_aligned", "skipped") if k in emergent
        },
        "skipped": skipped,
        "config": cfg.to_dict(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.plots:
        result["plots"] = _plots(result, data, embeds, out_dir, cfg)
        lap("plots", t)
    result["timings_s"] = timings
    result["wall_time_s"] = round(time.perf_counter() - t0, 3)
    _write_json(out_dir / "metrics.json", result)
    if cfg.merge_into_export:
        merge_into_export_metrics(export_dir / "metrics.json", cfg.split, result)
    return result


def _parse_pairs(pairs: list[str] | list[list[str]]) -> list[list[str]]:
    """Validated unordered pairs from ``["text-image", ...]`` or ``[["text", "image"], ...]``."""
    try:
        return [sorted(M.normalize_pair(p)) for p in pairs]
    except ValueError as e:
        raise EvaluationError(str(e)) from e


def _plots(
    result: dict[str, Any],
    data: SplitData,
    embeds: dict[str, tuple[np.ndarray, np.ndarray]],
    out_dir: Path,
    cfg: EvalConfig,
) -> dict[str, str]:
    from jobs.evaluation import plots as P

    mods = result["modalities"]
    paths: dict[str, str] = {}
    mat = np.full((len(mods), len(mods)), np.nan)
    for i, a in enumerate(mods):
        for j, b in enumerate(mods):
            entry = result["retrieval"].get(_pair_key(a, b), {})
            if entry and "skipped" not in entry:
                mat[i, j] = _r1(entry)
    emergent = {
        tuple(k.split("->")) for k in result["emergent_alignment"].get("emergent_pairs", [])
    }
    paths["retrieval_r1"] = str(
        P.retrieval_heatmap(
            mat,
            mods,
            emergent,
            out_dir / "retrieval_r1.png",
            title=f"Retrieval R@1 ({result['retrieval_level']}-level, {cfg.split})",
        )
    )
    # Subsample rows evenly across modalities so that the plot stays readable and fast.
    rng = np.random.default_rng(cfg.seed)
    per_mod = max(1, cfg.projection_max_points // max(1, len(mods)))
    pts, labs, pmods = [], [], []
    for m in mods:
        rows, e = embeds[m]
        take = np.sort(rng.permutation(len(rows))[:per_mod])
        pts.append(e[take])
        labs.extend(data.labels[rows[i]] for i in take)
        pmods.extend([m] * len(take))
    points = np.concatenate(pts)
    if len(points) >= 2:
        paths["embeddings_2d"] = str(
            P.embedding_projection(
                points, labs, pmods, out_dir / "embeddings_2d.png", cfg.projection, cfg.seed
            )
        )
    zs = result["zero_shot"].get("per_modality", {})
    acc = {m: v["accuracy"] for m, v in zs.items() if "accuracy" in v}
    if acc:
        chance = 1.0 / len(result["zero_shot"]["class_names"])
        paths["zero_shot"] = str(
            P.accuracy_bars(
                acc,
                out_dir / "zero_shot.png",
                f"Zero-shot accuracy per modality ({cfg.split})",
                chance=chance,
            )
        )
    fu = result["fusion"]
    if "fused_accuracy" in fu:
        vals = {m: fu["single_accuracy"][m] for m in fu["modalities"]}
        vals["fused"] = fu["fused_accuracy"]
        paths["fusion"] = str(
            P.accuracy_bars(
                vals,
                out_dir / "fusion.png",
                f"Head accuracy: fused vs single (gain {fu['fusion_gain']:+.3f})",
                chance=fu["chance"],
                highlight="fused",
            )
        )
    return paths


def _write_json(path: Path, obj: Any) -> None:
    """Atomic write (tmp + rename) so a crash never leaves half a metrics file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=float) + "\n")
    os.replace(tmp, path)


def merge_into_export_metrics(path: Path, split: str, result: dict[str, Any]) -> None:
    """Sets ``metrics["evaluation"][split] = result`` in the export's metrics.json.

    Other keys (training metrics) are kept; an unreadable file is kept aside as
    ``metrics.json.corrupt`` rather than overwritten silently.
    """
    existing: dict[str, Any] = {}
    if path.is_file():
        try:
            existing = json.loads(path.read_text())
            if not isinstance(existing, dict):
                raise ValueError("top level is not an object")
        except ValueError as e:
            backup = path.with_name(path.name + ".corrupt")
            os.replace(path, backup)
            print(f"warning: {path} was unreadable ({e}); moved to {backup}", file=sys.stderr)
            existing = {}
    summary = {k: v for k, v in result.items() if k != "config"}
    evaluation = existing.get("evaluation")
    existing["evaluation"] = {
        **(evaluation if isinstance(evaluation, dict) else {}),
        split: summary,
    }
    _write_json(path, existing)


def format_summary(result: dict[str, Any]) -> str:
    """A compact text table of the headline numbers."""
    mods = result["modalities"]
    lines = [
        f"evaluation of {result['export']} on split {result['split']!r} "
        f"({result['n_rows']} rows; {result['retrieval_level']}-level retrieval)",
        "R@1  query\\gallery " + " ".join(f"{m[:10]:>10}" for m in mods),
    ]
    emergent = set(result["emergent_alignment"].get("emergent_pairs", []))
    for a in mods:
        cells = []
        for b in mods:
            e = result["retrieval"].get(_pair_key(a, b))
            if a == b or e is None or "skipped" in e:
                cells.append(f"{'-':>10}")
            else:
                star = "*" if _pair_key(a, b) in emergent else " "
                cells.append(f"{_r1(e):>9.3f}{star}")
        lines.append(f"     {a[:14]:<14} " + " ".join(cells))
    if emergent:
        lines.append("     (* emergent: pair never seen together in training)")
    zs = result["zero_shot"]
    if "per_modality" in zs:
        accs = ", ".join(
            f"{m} {v['accuracy']:.3f}" for m, v in zs["per_modality"].items() if "accuracy" in v
        )
        lines.append(f"zero-shot acc ({len(zs['class_names'])} classes): {accs}")
    else:
        lines.append(f"zero-shot: skipped ({zs['skipped']})")
    fu = result["fusion"]
    if "fused_accuracy" in fu:
        lines.append(
            f"fusion ({'+'.join(fu['modalities'])}, n={fu['n']}): fused {fu['fused_accuracy']:.3f}"
            f" vs best single {fu['best_single_modality']} {fu['best_single_accuracy']:.3f}"
            f" -> gain {fu['fusion_gain']:+.3f}"
        )
        pw = fu.get("pairwise", {})
        if "mean_gain" in pw:
            lines.append(
                f"fusion of modality pairs: mean gain {pw['mean_gain']:+.3f} over "
                f"{len(pw['pairs'])} pairs ({pw['pairs_with_gain']} gain, "
                f"{pw['pairs_with_loss']} lose)"
            )
    else:
        lines.append(f"fusion gain: skipped ({fu['skipped']})")
    em = result["emergent_alignment"]
    if "mean_R@1" in em:
        al = em.get("mean_R@1_aligned")
        lines.append(
            f"emergent alignment: mean R@1 {em['mean_R@1']:.3f} over {len(em['R@1'])} pairs"
            + (f" (aligned pairs {al:.3f})" if al is not None else "")
        )
    else:
        lines.append(f"emergent alignment: skipped ({em['skipped']})")
    for k, why in result["skipped"].items():
        lines.append(f"skipped {k}: {why}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.evaluate",
        description="Evaluate an OmniRay export on a prepared split.",
    )
    p.add_argument("--export", required=True, type=Path, help="export dir (Contract 3)")
    p.add_argument("--data", required=True, help="prepared shards dir or URI (Contract 2)")
    p.add_argument("--split", default=None, help="split to evaluate (default: config's, 'test')")
    p.add_argument(
        "--out", type=Path, default=None, help="output dir (default <export>/eval/<split>)"
    )
    p.add_argument("--config", type=Path, default=None, help="YAML of EvalConfig")
    p.add_argument(
        "--aligned-pairs",
        default=None,
        help="comma-separated modality pairs trained together, e.g. text-image,text-audio "
        "(default: the export's training info)",
    )
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the config")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        overrides = list(args.overrides)
        if args.split is not None:
            overrides.append(f"split={args.split}")
        cfg = load_config(EvalConfig, args.config, overrides)
        pairs = None
        if args.aligned_pairs is not None:
            pairs = [p for p in args.aligned_pairs.split(",") if p.strip()]
        result = run_evaluation(args.export, args.data, cfg, args.out, aligned_pairs=pairs)
    except (EvaluationError, ConfigError) as e:
        print(f"jobs.evaluate: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(format_summary(result))
    out = Path(args.out) if args.out else Path(args.export) / "eval" / cfg.split
    print(f"wrote {out / 'metrics.json'} and {len(result.get('plots', {}))} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
