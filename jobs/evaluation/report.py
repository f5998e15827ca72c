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
    emergent = set(result["emergent_alignment"].get("emergent_pairs", []))
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


#: The six modalities of the first OmniDigits release: the quality targets (mean R@1 over
#: their 30 ordered pairs) are stated over these, whatever was added since.
ORIGINAL_MODALITIES = ("text", "image", "audio", "video", "pointcloud", "signal")


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


def compact_summary(result: dict[str, Any]) -> list[str]:
    """The headline numbers in a few lines of at most ~250 characters (the console's; the
    full table of :func:`format_summary` goes to the log and ``metrics.json``)."""
    lines = []
    r1 = (result.get("retrieval_summary") or {}).get("R@1", {})
    if r1:
        worst = min(r1, key=r1.get)
        orig = mean_r1_over(result, ORIGINAL_MODALITIES)
        line = f"retrieval R@1: mean {np.mean(list(r1.values())):.3f} over {len(r1)} pairs"
        if orig["mean"] is not None and orig["pairs"] != len(r1):
            line += f" ({orig['mean']:.3f} over the {orig['pairs']} pairs of the first 6)"
        lines.append(line + f", lowest {worst} {r1[worst]:.3f}")
    em = result["emergent_alignment"]
    if "mean_R@1" in em:
        pairs = ", ".join(f"{k} {v:.3f}" for k, v in em["R@1"].items())
        lines.append(f"emergent alignment: mean R@1 {em['mean_R@1']:.3f} ({pairs})"[:250])
    cl = result.get("classification", {})
    panels = classification_panels(cl)
    if panels:
        cells = ", ".join(
            f"{k} {v['accuracy']:.2f}/{v['balanced_accuracy']:.2f}" for k, v in panels.items()
        )
        lines.append(f"classification head, per sample (acc/balanced): {cells}"[:250])
    zs = result["zero_shot"]
    if "per_modality" in zs:
        cells = ", ".join(
            f"{m} {v['accuracy']:.2f}" for m, v in zs["per_modality"].items() if "accuracy" in v
        )
        lines.append(f"zero-shot accuracy: {cells}"[:250])
    fu = result["fusion"]
    if "fused_accuracy" in fu:
        lines.append(
            f"fusion ({'+'.join(fu['modalities'])}): {fu['fused_accuracy']:.3f} vs best single "
            f"{fu['best_single_modality']} {fu['best_single_accuracy']:.3f}, "
            f"gain {fu['fusion_gain']:+.3f}"
        )
    return lines
