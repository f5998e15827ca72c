"""What an evaluation leaves behind: PNG figures, ``metrics.json`` (written atomically and
merged into the export's) and the text summary ``python -m jobs.evaluate`` prints."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from jobs.evaluation.config import EvalConfig
from jobs.evaluation.data import SplitData
from jobs.evaluation.metrics import headline_r1, pair_key


def draw_plots(
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
            entry = result["retrieval"].get(pair_key(a, b), {})
            if entry and "skipped" not in entry:
                mat[i, j] = headline_r1(entry)
    emergent = {tuple(k.split("->")) for k in never_trained_pairs(result)}
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
    for key, title in (
        ("classification", f"Classification head, per sample ({cfg.split}): row = true class"),
        ("zero_shot", f"Zero-shot ({cfg.split}): row = true class"),
    ):
        reports = classification_panels(result.get(key, {}))
        if reports:
            names = result[key]["class_names"]
            paths[f"confusion_{key}"] = str(
                P.confusion_matrices(
                    {k: np.asarray(v["confusion"]) for k, v in reports.items()},
                    names,
                    out_dir / f"confusion_{key}.png",
                    title,
                    {
                        k: f"acc {v['accuracy']:.3f}, balanced {v['balanced_accuracy']:.3f}"
                        for k, v in reports.items()
                    },
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


def never_trained_pairs(result: dict[str, Any]) -> list[str]:
    """Ordered pairs never trained together (``"a->b"``), starred in tables and plots;
    results of older evaluations only list ``emergent_pairs``."""
    em = result.get("emergent_alignment") or {}
    return list(em.get("never_trained_pairs", em.get("emergent_pairs", [])))


def classification_panels(section: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The measured reports of a ``classification`` or ``zero_shot`` section, by name:
    ``fused`` first (head only), then each modality."""
    out: dict[str, dict[str, Any]] = {}
    if "confusion" in section.get("fused", {}):
        out["fused"] = section["fused"]
    for m, v in section.get("per_modality", {}).items():
        if "confusion" in v:
            out[m] = v
    return out


def _recall_line(rep: dict[str, Any], limit: int = 12) -> str:
    items = [(c, r) for c, r in rep["per_class_recall"].items() if r is not None]
    text = ", ".join(f"{c} {r:.2f}" for c, r in items[:limit])
    return text + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def write_json(path: Path, obj: Any) -> None:
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
    write_json(path, existing)


def format_classification(result: dict[str, Any]) -> list[str]:
    """The classification block of the summary screen: the classifier head's per-sample
    accuracy / balanced accuracy (fused and each modality), recall per class, and the
    zero-shot accuracies.

    Args:
        result: Evaluation's result (``metrics.json`` of ``jobs.evaluate --out``); only its
            ``classification`` and ``zero_shot`` sections are read, and either may be
            missing (e.g. the demo report of an older evaluation).

    Returns:
        Lines of text (empty when neither section is there).
    """
    lines: list[str] = []
    cl = result.get("classification") or {}
    panels = classification_panels(cl)
    if panels:
        n_cls = len(cl["class_names"])
        lines.append(
            f"classification head, per sample ({n_cls} classes, chance {1 / n_cls:.3f}):"
            "  accuracy / balanced accuracy"
        )
        for k, v in panels.items():
            what = "fused (all of a row's modalities)" if k == "fused" else k
            lines.append(
                f"     {what:<34} {v['accuracy']:.3f} / {v['balanced_accuracy']:.3f}  (n={v['n']})"
            )
        best = panels.get("fused") or next(iter(panels.values()))
        which = "fused" if "fused" in panels else next(iter(panels))
        lines.append(f"     recall per class ({which}): {_recall_line(best)}")
    elif "skipped" in cl:
        lines.append(f"classification head: skipped ({cl['skipped']})")
    zs = result.get("zero_shot") or {}
    if "per_modality" in zs:
        accs = ", ".join(
            f"{m} {v['accuracy']:.3f}/{v['balanced_accuracy']:.3f}"
            for m, v in zs["per_modality"].items()
            if "accuracy" in v
        )
        lines.append(
            f"zero-shot accuracy/balanced ({len(zs['class_names'])} classes): {accs or 'none'}"
        )
    elif "skipped" in zs:
        lines.append(f"zero-shot: skipped ({zs['skipped']})")
    return lines


def format_summary(result: dict[str, Any]) -> str:
    """A compact text table of the headline numbers."""
    mods = result["modalities"]
    lines = [
        f"evaluation of {result['export']} on split {result['split']!r} "
        f"({result['n_rows']} rows; {result['retrieval_level']}-level retrieval)",
        "R@1  query\\gallery " + " ".join(f"{m[:10]:>10}" for m in mods),
    ]
    emergent = set(never_trained_pairs(result))
    for a in mods:
        cells = []
        for b in mods:
            e = result["retrieval"].get(pair_key(a, b))
            if a == b or e is None or "skipped" in e:
                cells.append(f"{'-':>10}")
            else:
                star = "*" if pair_key(a, b) in emergent else " "
                cells.append(f"{headline_r1(e):>9.3f}{star}")
        lines.append(f"     {a[:14]:<14} " + " ".join(cells))
    if emergent:
        lines.append("     (* emergent: pair never seen together in training)")
    lines += format_classification(result)
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
    lines.append(emergent_line(result["emergent_alignment"]))
    for k, why in result["skipped"].items():
        lines.append(f"skipped {k}: {why}")
    return "\n".join(lines)


def mean_r1_over(result: dict[str, Any], modalities: tuple[str, ...] | list[str]) -> dict:
    """Mean headline R@1 over the ordered pairs among ``modalities`` that were measured."""
    r1 = (result.get("retrieval_summary") or {}).get("R@1", {})
    vals = [
        r1[pair_key(a, b)]
        for a in modalities
        for b in modalities
        if a != b and pair_key(a, b) in r1
    ]
    return {"mean": float(np.mean(vals)) if vals else None, "pairs": len(vals)}


def emergent_line(em: dict[str, Any]) -> str:
    """``emergent alignment R@1, held out in training (training.yaml): audio->pointcloud 0.715,
    pointcloud->audio 0.891, mean 0.803; aligned pairs 0.861; 6 other pairs never trained
    together 0.475`` (or why it was skipped)."""
    if "mean_R@1" not in em:
        return f"emergent alignment: skipped ({em.get('skipped', 'not measured')})"
    which = em.get("selected_by") or "pairs never trained together"
    r1 = em["R@1"]
    if len(r1) <= 6:  # each direction
        cells = ", ".join(f"{k} {v:.3f}" for k, v in r1.items())
        line = f"emergent alignment R@1, {which}: {cells}"
        if len(r1) > 1:
            line += f", mean {em['mean_R@1']:.3f}"
    else:
        lo, hi = min(r1, key=r1.get), max(r1, key=r1.get)
        line = (
            f"emergent alignment R@1, {which}: mean {em['mean_R@1']:.3f} over {len(r1)} "
            f"ordered pairs (lowest {lo} {r1[lo]:.3f}, highest {hi} {r1[hi]:.3f})"
        )
    if em.get("mean_R@1_aligned") is not None:
        line += f"; aligned pairs {em['mean_R@1_aligned']:.3f}"
    other = em.get("other_never_trained") or {}
    if other.get("R@1"):
        line += f"; {len(other['R@1'])} other pairs never trained together {other['mean_R@1']:.3f}"
    return line


def accuracy_table(result: dict[str, Any], baselines: dict[str, Any] | None = None) -> list[str]:
    """Per-sample accuracy / balanced accuracy of every labelled modality, one row each:
    the classifier head (and its fused row) and zero-shot, with the baseline's accuracy
    as a last column when ``baselines`` (``benchmarks.baselines``' result) is given.

    A section that was not measured (a label-only corpus has no zero-shot: no text
    branch) shows ``-`` and its reason under the table. Empty when neither was measured.
    """
    cl = result.get("classification") or {}
    zs = result.get("zero_shot") or {}
    head = classification_panels(cl)
    zero = {m: v for m, v in (zs.get("per_modality") or {}).items() if "balanced_accuracy" in v}
    base = (baselines or {}).get("per_modality") or {}
    rows = list(dict.fromkeys([*head, *zero]))
    if not rows:
        return []
    names = cl.get("class_names") or zs.get("class_names") or []
    notes = [f"{len(names)} classes, chance {1 / len(names):.2f}"] if names else []
    comp = (baselines or {}).get("comparison") or {}
    if comp:
        n_ok = sum(1 for r in comp.values() if r.get("omniray_matches_baseline"))
        notes.append(f"OmniRay >= baseline on {n_ok}/{len(comp)}")
    title = "accuracy/balanced per sample"
    width = max(len(title), *(len(r) + 4 for r in rows))

    def cell(rep: dict[str, Any] | None) -> str:
        if not rep or "accuracy" not in rep:
            return f"{'-':<10}"
        return f"{rep['accuracy']:.2f}/{rep['balanced_accuracy']:.2f} "

    header = f"{title:<{width}}  {'head':<10} {'zero-shot':<10}" + (" baseline" if base else "")
    lines = [header + (f"  ({'; '.join(notes)})" if notes else "")]
    for r in rows:
        line = f"    {r:<{width - 4}}  {cell(head.get(r))} {cell(zero.get(r))}"
        if base:
            b = (base.get(r) or {}).get("accuracy")
            line += f" {'-' if b is None else f'{b:.2f}'}"
        lines.append(line.rstrip())
    for what, sec in (("classification head", cl), ("zero-shot", zs)):
        if "skipped" in sec:
            lines.append(f"    {what}: skipped ({sec['skipped']})")
    return lines


def write_per_class_recall(result: dict[str, Any], path: Path) -> Path | None:
    """``per_class_recall.csv``: one row per classifier-head panel (fused, each modality)
    and zero-shot modality: source, modality, n, accuracy, balanced accuracy, then the
    recall of each class (empty where the split has no row of that class)."""
    import csv

    rows = []
    for source, key in (("head", "classification"), ("zero-shot", "zero_shot")):
        for name, rep in classification_panels(result.get(key) or {}).items():
            rows.append((source, name, rep))
    if not rows:
        return None
    classes = list(rows[0][2]["per_class_recall"])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["source", "modality", "n", "accuracy", "balanced_accuracy", *classes])
        for source, name, rep in rows:
            rec = rep["per_class_recall"]
            w.writerow(
                [
                    source,
                    name,
                    rep["n"],
                    f"{rep['accuracy']:.4f}",
                    f"{rep['balanced_accuracy']:.4f}",
                ]
                + ["" if rec.get(c) is None else f"{rec[c]:.4f}" for c in classes]
            )
    os.replace(tmp, path)
    return path


def compact_summary(result: dict[str, Any], *, table: bool = True) -> list[str]:
    """The headline numbers in a few lines of at most ~250 characters (the console's; the
    full table of :func:`format_summary` goes to the log and ``metrics.json``).

    With ``table`` the per-sample accuracy table of :func:`accuracy_table` is part of it
    (``jobs.demo`` leaves it out: its summary screen shows it next to the baselines).
    """
    lines = []
    r1 = (result.get("retrieval_summary") or {}).get("R@1", {})
    if r1:
        worst = min(r1, key=r1.get)
        n_mod = len(result.get("modalities") or [])
        lines.append(
            f"retrieval R@1: mean {np.mean(list(r1.values())):.3f} over {len(r1)} ordered pairs"
            f" of {n_mod} modalities, lowest {worst} {r1[worst]:.3f}"
        )
    lines.append(emergent_line(result["emergent_alignment"])[:250])
    if table:
        lines += accuracy_table(result)
    fu = result["fusion"]
    if "fused_accuracy" in fu:
        lines.append(
            f"fusion ({'+'.join(fu['modalities'])}): {fu['fused_accuracy']:.3f} vs best single "
            f"{fu['best_single_modality']} {fu['best_single_accuracy']:.3f}, "
            f"gain {fu['fusion_gain']:+.3f}"
        )
    return lines
