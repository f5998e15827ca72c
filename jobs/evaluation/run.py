"""One evaluation of an export on a prepared split: the library behind ``jobs.evaluate``.

:func:`run_evaluation` loads the export through :func:`jobs.exports.load_export` (the
loader serving uses too), reads the split, embeds every row once, and measures cross-modal
retrieval, zero-shot classification (:mod:`models.zeroshot`, the classifier the service
runs, with the export's templates unless the config overrides them), per-sample
classification by the head (each row fused over its modalities, and each modality alone:
accuracy, balanced accuracy, per-class recall, confusion matrix), the fusion gain and
emergent alignment. It writes ``metrics.json`` and the figures (:mod:`.report`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from jobs.evaluation import metrics as M
from jobs.evaluation.config import EvalConfig
from jobs.evaluation.data import (
    EvaluationError,
    SplitData,
    list_splits,
    load_split,
    read_label_text,
    read_training_info,
)
from jobs.evaluation.encode import SamplePass
from jobs.evaluation.fusion import fusion_pairs, fusion_plan, fusion_result
from jobs.evaluation.metrics import headline_r1, pair_key
from jobs.evaluation.report import (
    draw_plots,
    merge_into_export_metrics,
    write_json,
    write_per_class_recall,
)

Embeds = dict[str, tuple[np.ndarray, np.ndarray]]  # modality -> (rows (n,), embeddings (n, E))


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
        data_dir: shards dir of Contract 2 (a local path or a URI read through pyarrow.fs).
        cfg: evaluation config (``cfg.split`` picks the split).
        out_dir: where metrics.json and PNGs go (default ``<export>/eval/<split>``).
        aligned_pairs: overrides the export's training info, e.g. ``["text-image"]``.

    Returns:
        The metrics dict written to ``<out>/metrics.json``.

    Raises:
        EvaluationError: user errors (bad paths, split, export).
    """
    from jobs.evaluation.encode import encode_samples
    from jobs.exports import ExportError, check_export, load_export

    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 4)
        return now

    try:
        export_dir = check_export(export_dir)
    except ExportError as e:
        raise EvaluationError(str(e)) from e
    data_loc = str(data_dir)
    out_dir = Path(out_dir) if out_dir else export_dir / "eval" / cfg.split
    info = read_training_info(export_dir)
    # Resolve user-given pairs before any heavy work so that a typo fails fast.
    if aligned_pairs is not None:
        aligned, source = _parse_pairs(aligned_pairs), "command line"
    elif cfg.aligned_pairs is not None:
        aligned, source = _parse_pairs(cfg.aligned_pairs), "config"
    else:
        aligned, source = info.aligned_pairs, info.source.get("aligned_pairs", "")
    if cfg.emergent_pairs is not None:
        held_out, held_source = _parse_pairs(cfg.emergent_pairs), "chosen in the config"
    else:
        held_out = info.emergent_pairs
        held_source = f"held out in training ({info.source.get('emergent_pairs', '')})"
    data = load_split(data_loc, cfg.split, cfg.max_rows)
    t = lap("load_split", t0)
    try:
        export = load_export(export_dir, device=cfg.device)
    except ExportError as e:
        raise EvaluationError(str(e)) from e
    model = export.model
    t = lap("load_model", t)

    model_mods = list(model.modalities)
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

    # One pass over every row with all its modalities gives the per-modality embeddings and
    # the head's per-sample logits (each modality alone, and the row's fused modalities).
    sp = encode_samples(model, data, mods, cfg.batch_size)
    embeds: Embeds = sp.embeds
    t = lap("embed", t)
    head_names, head_skip = head_class_names(model, info, cfg)
    classification = (
        _classification(sp, data, head_names, cfg) if head_names else {"skipped": head_skip}
    )
    plan = fusion_plan(model, data, mods, info, cfg)
    fusion: dict[str, Any] = {k: v for k, v in plan.items() if k == "skipped"}
    if "skipped" not in plan:
        f_logits, s_logits = _fusion_logits(model, data, plan, sp, cfg.batch_size)
        fusion = fusion_result(plan, f_logits, s_logits, cfg)
        fusion["pairwise"] = fusion_pairs(model, data, mods, info, cfg)
    t = lap("fusion", t)

    has_labels = any(x is not None for x in data.labels)
    retrieval = _retrieval(data, mods, embeds, has_labels, cfg)
    t = lap("retrieval", t)
    class_names = (
        cfg.label_names or info.label_names or sorted({x for x in data.labels if x is not None})
    )
    zero_shot = _zero_shot(export, data, embeds, class_names, cfg)
    t = lap("zero_shot", t)
    emergent = _emergent(retrieval, mods, aligned, source, held_out, held_source)
    generation = _generation(model, data, data_loc, cfg, out_dir)
    t = lap("generation", t)
    r1 = {k: round(headline_r1(v), 4) for k, v in retrieval.items() if "skipped" not in v}
    mean_r1 = float(np.mean(list(r1.values()))) if r1 else None

    level = "category" if has_labels else "instance"
    result: dict[str, Any] = {
        "split": cfg.split,
        "export": str(export_dir),
        "data": data_loc,
        "n_rows": len(data),
        "modalities": mods,
        "rows_per_modality": {m: int(len(embeds[m][0])) for m in mods},
        "retrieval_level": level,
        "retrieval": retrieval,
        "zero_shot": zero_shot,
        "classification": classification,
        "fusion": fusion,
        "emergent_alignment": emergent,
        "generation": generation,
        # Compact headline views (reports, jobs.demo); the full numbers are above.
        "mean_R@1": mean_r1,
        "retrieval_summary": {"level": level, "R@1": r1},
        "emergent": {
            k: emergent[k]
            for k in ("mean_R@1", "R@1", "selected_by", "mean_R@1_aligned", "skipped")
            if k in emergent
        },
        "skipped": skipped,
        "config": cfg.to_dict(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.plots:
        result["plots"] = draw_plots(result, data, embeds, out_dir, cfg)
        lap("plots", t)
    recall_csv = write_per_class_recall(result, out_dir / "per_class_recall.csv")
    if recall_csv is not None:
        result["tables"] = {"per_class_recall": str(recall_csv)}
    result["timings_s"] = timings
    result["wall_time_s"] = round(time.perf_counter() - t0, 3)
    write_json(out_dir / "metrics.json", result)
    if cfg.merge_into_export:
        merge_into_export_metrics(export_dir / "metrics.json", cfg.split, result)
    return result


def _generation(model, data, data_loc: str, cfg: EvalConfig, out_dir: Path) -> dict[str, Any]:
    """Generation figures (:mod:`jobs.evaluation.generation`) when the export has heads;
    the independent classifiers train on the ``train`` split."""
    from jobs.evaluation.generation import GenerationEvalConfig, evaluate_generation

    if not len(getattr(model, "generators", {})):
        return {"skipped": "the export has no generation heads"}
    if cfg.split == "train" or "train" not in list_splits(data_loc):
        return {"skipped": "needs a train split (the classifiers) besides the evaluated one"}
    train = load_split(data_loc, "train", GenerationEvalConfig().max_train_rows)
    reports = out_dir if cfg.plots else None
    return evaluate_generation(model, data, train, GenerationEvalConfig(), reports)


def head_class_names(model, info, cfg: EvalConfig) -> tuple[list[str] | None, str]:
    """The classification head's class names, or ``(None, why the head is not measured)``."""
    from jobs.evaluation.encode import num_classes

    n_cls = num_classes(model)
    if n_cls <= 0:
        return None, "export has no classification head (num_classes = 0)"
    names = cfg.label_names or info.label_names
    if not names:
        return None, (
            "label names of the classification head are unknown "
            "(not in the export's training info; pass label_names=[...])"
        )
    if len(names) != n_cls:
        return None, f"{len(names)} label names but the head has {n_cls} classes"
    return list(names), ""


def _classification(
    sp: SamplePass, data: SplitData, names: list[str], cfg: EvalConfig
) -> dict[str, Any]:
    """Per-sample head classification: each row fused over all its modalities, and each
    modality alone (:func:`metrics.class_score_accuracy` reports)."""
    if not any(x is not None for x in data.labels):
        return {"skipped": "the split has no labels"}
    out: dict[str, Any] = {"class_names": names, "source": "classification head"}
    if sp.fused_logits is not None and len(sp.fused_rows):
        labels = [data.labels[i] for i in sp.fused_rows]
        rep = M.class_score_accuracy(sp.fused_logits, labels, names, tie_decimals=cfg.tie_decimals)
        out["fused"] = rep if rep["n"] else {"skipped": "no row with a known class label"}
    per: dict[str, Any] = {}
    for m, lg in sp.modality_logits.items():
        labels = [data.labels[i] for i in sp.embeds[m][0]]
        rep = M.class_score_accuracy(lg, labels, names, tie_decimals=cfg.tie_decimals)
        per[m] = rep if rep["n"] else {"skipped": "no row with a known class label"}
    out["per_modality"] = per
    unknown = sum(1 for x in data.labels if x is not None and x not in set(names))
    if unknown:
        out["rows_with_unknown_label"] = unknown
    return out


def _fusion_logits(
    model, data: SplitData, plan: dict[str, Any], sp: SamplePass, batch_size: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Fused logits over ``plan["modalities"]`` and single-modality logits on the plan's rows;
    rows whose modalities are exactly those reuse the sample pass, the rest run the head."""
    from jobs.evaluation.encode import head_logits

    fmods, rows = plan["modalities"], plan["rows"]
    single = {m: sp.modality_logits[m][np.searchsorted(sp.embeds[m][0], rows)] for m in fmods}
    pos = np.searchsorted(sp.fused_rows, rows)
    same = np.asarray([sp.row_modalities[p] == tuple(fmods) for p in pos], dtype=bool)
    fused = np.zeros((len(rows), plan["num_classes"]), np.float32)
    if same.any() and sp.fused_logits is not None:
        fused[same] = sp.fused_logits[pos[same]]
    if (~same).any():
        _, f_other, _ = head_logits(model, data, fmods, rows[~same], batch_size)
        fused[~same] = f_other
    return fused, single


def _retrieval(
    data: SplitData, mods: list[str], embeds: Embeds, has_labels: bool, cfg: EvalConfig
) -> dict[str, Any]:
    """R@K of every ordered (query, gallery) pair on the rows that have both."""
    retrieval: dict[str, Any] = {}
    for a, b in M.ordered_pairs(mods):
        rows = data.rows_with([a, b])
        key = pair_key(a, b)
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
    return retrieval


def _zero_shot(
    export: Any, data: SplitData, embeds: Embeds, class_names: list[str], cfg: EvalConfig
) -> dict[str, Any]:
    """Zero-shot accuracy per modality with :mod:`models.zeroshot` (the service's classifier).

    The templates are the export's (``zero_shot.yaml``) unless ``cfg.prompt_templates``
    overrides them; ``cfg.label_text`` (else the export's ``label_text``) maps a class name
    to the text put into ``{label}``.
    """
    from jobs.evaluation.encode import embed_arrays
    from models import zeroshot as Z
    from pipelines.featurize import SampleError

    prompt_mod = cfg.prompt_modality
    if prompt_mod not in export.featurizers:
        return {"skipped": f"the model has no {prompt_mod} branch to embed label prompts"}
    if not class_names:
        return {"skipped": "no label names (split has no labels and export has none)"}
    templates = list(cfg.prompt_templates or export.templates)
    source = "config" if cfg.prompt_templates else "export"
    label_text = cfg.label_text or (read_label_text(export.path) if export.path else {})
    texts = [label_text.get(c, c) for c in class_names]
    featurizer = export.featurizers[prompt_mod]

    def embed_texts(prompts: list[str]) -> np.ndarray:
        ids = [np.asarray(featurizer.featurize(p)) for p in prompts]
        return embed_arrays(export.model, prompt_mod, ids, cfg.batch_size)  # (n, E)

    try:
        classifier = Z.zero_shot_classifier(embed_texts, texts, templates)  # (C, E)
    except SampleError as e:
        return {"skipped": f"a label prompt cannot be tokenized ({e}); check prompt_templates"}
    per_mod: dict[str, Any] = {}
    for m, (rows, e) in embeds.items():
        labels = [data.labels[i] for i in rows]
        scores = Z.zero_shot_scores(e, classifier).double().numpy()  # (n, C) cosine
        res = M.class_score_accuracy(scores, labels, class_names, tie_decimals=cfg.tie_decimals)
        per_mod[m] = res if res["n"] else {"skipped": "no rows with a known class label"}
    if "accuracy" in per_mod.get(prompt_mod, {}):
        # Those rows go through the same encoder as the prompts: not a cross-modal measure.
        per_mod[prompt_mod]["note"] = (
            f"{prompt_mod} vs {prompt_mod} prompts: caption/prompt agreement, not cross-modal"
        )
    return {
        "per_modality": per_mod,
        "class_names": class_names,
        "templates": templates,
        "templates_source": source,
        "example_prompts": Z.template_prompts(texts[:1], templates),
        "label_text_source": "config" if cfg.label_text else "export",
    }


def _emergent(
    retrieval: dict[str, Any],
    mods: list[str],
    aligned: list[list[str]] | None,
    source: str,
    held_out: list[list[str]] | None = None,
    held_source: str = "",
) -> dict[str, Any]:
    """R@1 of the emergent pairs, each direction, next to that of the aligned pairs.

    The emergent pairs are ``held_out`` (pairs kept out of alignment on purpose: the
    export's record, or the evaluation config's) when given, else every pair of ``mods``
    never trained together; never-trained pairs outside ``held_out`` are reported apart
    (``other_never_trained``).

    Raises:
        EvaluationError: a ``held_out`` pair was aligned in training.
    """
    if aligned is None:
        return {
            "skipped": "the export records no aligned modality pairs "
            "(pass --aligned-pairs a-b,c-d or aligned_pairs=[...])"
        }
    aligned_set = {frozenset(p) for p in aligned}
    never = M.emergent_pairs(mods, aligned)
    held = {frozenset(p) for p in held_out or []}
    trained = sorted("-".join(sorted(p)) for p in held & aligned_set)
    if trained:
        raise EvaluationError(
            f"emergent pair(s) {trained} ({held_source}) were aligned in training "
            f"({source}): an emergent pair is one never trained together"
        )
    pairs = [p for p in never if frozenset(p) in held] if held else never

    def r1(ps: list[tuple[str, str]]) -> dict[str, float]:
        return {
            pair_key(a, b): headline_r1(retrieval[pair_key(a, b)])
            for a, b in ps
            if "skipped" not in retrieval.get(pair_key(a, b), {"skipped": 1})
        }

    measured = r1(pairs)
    aligned_r1 = [
        headline_r1(v)
        for k, v in retrieval.items()
        if "skipped" not in v and frozenset(k.split("->")) in aligned_set
    ]
    out: dict[str, Any] = {
        "aligned_pairs": sorted("-".join(sorted(p)) for p in aligned_set),
        "source": source,
        "selected_by": held_source if held else "every pair never trained together",
        "emergent_pairs": [pair_key(a, b) for a, b in pairs],
        "never_trained_pairs": [pair_key(a, b) for a, b in never],
        "R@1": measured,
        "mean_R@1_aligned": float(np.mean(aligned_r1)) if aligned_r1 else None,
    }
    others = r1([p for p in never if p not in pairs])
    if others:
        out["other_never_trained"] = {
            "R@1": others,
            "mean_R@1": float(np.mean(list(others.values()))),
        }
    if not never:
        out["skipped"] = "every pair of modalities present was aligned in training"
    elif not pairs:
        names = sorted("-".join(sorted(p)) for p in held)
        out["skipped"] = f"the emergent pair(s) {names} need modalities this split lacks"
    elif not measured:
        out["skipped"] = "no emergent pair has enough rows with both modalities"
    else:
        out["mean_R@1"] = float(np.mean(list(measured.values())))
    return out


def _parse_pairs(pairs: list[str] | list[list[str]]) -> list[list[str]]:
    """Validated unordered pairs from ``["a-b", ...]`` or ``[["a", "b"], ...]``."""
    try:
        return [sorted(M.normalize_pair(p)) for p in pairs]
    except ValueError as e:
        raise EvaluationError(str(e)) from e
