"""The driver's decisions of ``prepare``, from the small per-row keys of stage 1 (no Ray).

:func:`plan_rows` keeps the first row of a repeated id, finds exact and near duplicates per
modality (each modality by its featurizer's method; captions only when ``dedupe.captions``),
drops the captions of wholly duplicated rows, and assigns rows to splits
(:mod:`pipelines.splits`) and shards. Rows are identified by their position in manifest
order (the keys' order), since an id may repeat. :func:`train_items` gathers the TRAIN
split's decoded items a fitted featurizer learns from.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter, defaultdict
from typing import Any

from pipelines.config import DataConfig
from pipelines.dedupe import (
    exact_modalities,
    find_duplicates,
    find_near_duplicates,
    near_modalities,
)
from pipelines.featurize import FEATURIZERS
from pipelines.schema import SPLITS
from pipelines.splits import assign_groups, split_groups, split_warnings
from pipelines.stages import pipeline_modalities, record
from pipelines.stats import with_total

__all__ = ["plan_rows", "row_split", "split_groups", "train_items"]


def row_split(plan: dict[str, Any], rid: str, group: str | None, fixed: str | None) -> str:
    """A kept row's split: the manifest's ``split``, else its group's (the id: no group)."""
    return fixed or plan["group_split"][group if group is not None else rid]


def plan_rows(
    keys: dict[str, list], cfg: DataConfig
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """Driver-side decisions from per-row keys (in manifest order): drops, duplicates,
    splits, shards.

    Returns:
        ``(plan, quarantine records sorted, info)``; ``plan`` holds ``drop_rows`` (ids),
        ``drop_index`` (positions of the later rows of a repeated id), ``drop_mods``,
        ``group_split``, ``num_shards``, ``kept``, ``split_rows``.
    """
    n = len(keys["id"])
    ids = keys["id"]
    quarantine: list[dict[str, Any]] = []
    ignored = sorted({c for u in keys["_unknown"] if u for c in u})
    for q in keys["_quarantine"]:
        if q:
            quarantine.extend(json.loads(q))
    row_ok = [keys["_row_error"][i] is None for i in range(n)]
    for i in range(n):
        if not row_ok[i]:
            quarantine.append(json.loads(keys["_row_error"][i]))

    # A repeated id keeps its first row (manifest order); the later ones are quarantined.
    first: dict[str, int] = {}
    drop_index: list[int] = []
    for i in range(n):
        if not row_ok[i]:
            continue
        if ids[i] in first:
            row_ok[i] = False
            drop_index.append(i)
            detail = f"id of manifest row {first[ids[i]] + 1} (kept), repeated on row {i + 1}"
            quarantine.append(record(ids[i], None, None, "duplicate_id", detail))
        else:
            first[ids[i]] = i

    valid = [i for i in range(n) if row_ok[i]]
    present = {i: set(keys["_present"][i] or ()) for i in valid}
    srcs = {i: json.loads(keys["_src"][i]) for i in valid}
    dropped_mods: dict[int, dict[str, str]] = defaultdict(dict)  # row -> {m: survivor id}
    dup_kinds: Counter = Counter()
    d = cfg.dedupe
    mods_all = pipeline_modalities()
    exact_mods, near = set(exact_modalities(d)), set(near_modalities(d))
    for m in mods_all:
        use_exact, use_near = m in exact_mods, m in near
        items = [i for i in valid if m in present[i]] if use_exact or use_near else []
        if not items:
            continue
        item_ids = [ids[i] for i in items]
        exact = [keys[f"_hash_{m}"][i] for i in items] if use_exact else None
        if use_near:
            near_keys = [keys[f"_near_{m}"][i] for i in items]
            method = FEATURIZERS[m].near_dedupe
            dups = find_near_duplicates(method, item_ids, near_keys, d, exact=exact)
        else:
            dups = find_duplicates(item_ids, exact=exact)
        for k, (s, kind) in dups.items():
            row, surv = items[k], ids[items[s]]
            dropped_mods[row][m] = surv
            dup_kinds[(m, kind)] += 1
            quarantine.append(
                record(ids[row], m, srcs[row].get(m), f"duplicate_of:{surv}", f"{kind} duplicate")
            )
    if d.drop_captions_of_duplicate_rows:
        _drop_captions(keys, ids, valid, present, srcs, dropped_mods, dup_kinds, quarantine)

    drop_rows: set[str] = set()
    kept_mods: dict[int, list[str]] = {}
    for i in valid:
        have = [m for m in mods_all if m in present[i] and m not in dropped_mods.get(i, {})]
        if have:
            kept_mods[i] = have
        else:
            drop_rows.add(ids[i])
            quarantine.append(
                record(
                    ids[i],
                    None,
                    None,
                    "no_valid_modality",
                    "every modality was refused or a duplicate",
                )
            )

    group_split, split_of, warnings = _assign_splits(keys, kept_mods, cfg)
    counts = Counter(split_of.values())
    split_rows = {s: counts[s] for s in SPLITS if counts[s]}
    num_shards = {s: math.ceil(split_rows.get(s, 0) / cfg.rows_per_shard) for s in SPLITS}

    combos: dict[str, Counter] = defaultdict(Counter)
    pairs: dict[str, Counter] = defaultdict(Counter)
    per_mod: dict[str, Counter] = defaultdict(Counter)
    split_labels: dict[str, Counter] = defaultdict(Counter)
    groups_in: dict[str, set[str]] = defaultdict(set)
    for i, have in kept_mods.items():
        split = split_of[i]
        combos["+".join(have)][split] += 1
        for a, b in itertools.combinations(have, 2):
            pairs[f"{a}-{b}"][split] += 1
        for m in have:
            per_mod[m][split] += 1
        if keys["label"][i] is not None:
            split_labels[split][keys["label"][i]] += 1
        groups_in[split].add(keys["group"][i] or ids[i])
    warnings += split_warnings(split_rows, split_labels, cfg.split)
    quarantine.sort(key=lambda r: (r["id"] or "", r["modality"] or "", r["reason"], r["detail"]))
    plan = {
        "drop_rows": sorted(drop_rows),
        "drop_index": drop_index,
        "drop_mods": {
            ids[i]: sorted(m) for i, m in dropped_mods.items() if ids[i] not in drop_rows
        },
        "group_split": group_split,
        "num_shards": num_shards,
        "kept": len(kept_mods),
        "split_rows": dict(split_rows),
    }
    info = {
        "rows_read": n,
        "rows_dropped": n - len(kept_mods),
        "ignored_columns": ignored,
        "duplicates": {f"{m}/{k}": c for (m, k), c in sorted(dup_kinds.items())},
        "combinations": {k: with_total(v) for k, v in sorted(combos.items())},
        "pairs": {k: with_total(v) for k, v in sorted(pairs.items())},
        "modalities": {m: with_total(per_mod[m]) for m in mods_all},
        "groups": {s: sorted(groups_in[s]) for s in SPLITS},
        "labels": {s: dict(sorted(split_labels[s].items())) for s in SPLITS},
        "cleaned": _cleaned(keys["_cleaned"]),
        "warnings": warnings,
    }
    return plan, quarantine, info


def _assign_splits(
    keys: dict[str, list], kept_mods: dict[int, list[str]], cfg: DataConfig
) -> tuple[dict[str, str], dict[int, str], list[str]]:
    """``(group_split, {row position: split}, warnings)`` of the kept rows: a row's
    manifest ``split`` wins, its group follows its fixed rows, the rest is dealt
    stratified by label (:func:`pipelines.splits.assign_groups`)."""
    ids = keys["id"]
    group_rows: Counter = Counter()
    group_labels: dict[str, Counter] = defaultdict(Counter)
    fixed: dict[str, Counter] = defaultdict(Counter)
    for i in kept_mods:
        g = keys["group"][i] or ids[i]
        group_rows[g] += 1
        if keys["label"][i] is not None:
            group_labels[g][keys["label"][i]] += 1
        if keys["split"][i] is not None:
            fixed[g][keys["split"][i]] += 1
    # A group's stratum: the label of most of its labelled rows (ties: the smallest); a
    # group of many classes (a writer, a subject) has none: dealing whole such groups
    # already spreads the classes, and per-label dealing of them would only skew ratios.
    labels = {}
    for g, c in group_labels.items():
        main = min(c, key=lambda lab: (-c[lab], lab))
        labels[g] = main if 2 * c[main] > sum(c.values()) else None
    group_split = assign_groups(dict(group_rows), cfg.split, labels, fixed)
    split_of = {i: keys["split"][i] or group_split[keys["group"][i] or ids[i]] for i in kept_mods}
    warnings = []
    mixed = sorted(g for g, c in fixed.items() if len(c) > 1)
    if mixed:
        warnings.append(
            f"{len(mixed)} group(s) have rows fixed to different splits (e.g. {mixed[0]!r}): "
            "those rows follow their split column, so the group spans splits"
        )
    return group_split, split_of, warnings


def _cleaned(notes: list[str | None]) -> dict[str, Any]:
    """``stats.json`` ``cleaned``: the repairs of ``Featurizer.decode_noted`` summed over
    every decoded item, in all and ``by_modality``."""
    total: Counter = Counter()
    by_mod: dict[str, Counter] = defaultdict(Counter)
    for n in notes:
        if not n:
            continue
        for m, c in json.loads(n).items():
            by_mod[m].update(c)
            total.update(c)
    out: dict[str, Any] = dict(sorted(total.items()))
    out["by_modality"] = {m: dict(sorted(c.items())) for m, c in sorted(by_mod.items())}
    return out


def _drop_captions(
    keys: dict[str, list],
    ids: list[str],
    valid: list[int],
    present: dict[int, set[str]],
    srcs: dict[int, dict[str, str]],
    dropped_mods: dict[int, dict[str, str]],
    dup_kinds: Counter,
    quarantine: list[dict[str, Any]],
) -> None:
    """Drops the captions (``Featurizer.is_caption`` modalities) of wholly duplicated rows.

    A row whose every other modality is a duplicate of the same survivor row loses a
    caption too when the caption's key (its ``caption_key``, else its exact hash) equals the
    survivor's (a new caption of duplicated content is new information and stays).
    """
    index_of = {ids[i]: i for i in valid}

    def key(m: str, i: int) -> str | None:
        k = keys[f"_caption_{m}"][i]
        return k if k is not None else keys[f"_hash_{m}"][i]

    for row, mods in dropped_mods.items():
        caps = {m for m in present[row] if m not in mods and FEATURIZERS[m].is_caption()}
        others = present[row] - caps
        if not caps or not others or not others <= set(mods):
            continue
        survivors = {mods[m] for m in others}
        if len(survivors) != 1:
            continue
        surv = survivors.pop()
        for m in sorted(caps):
            if key(m, row) is None or key(m, index_of[surv]) != key(m, row):
                continue
            mods[m] = surv
            dup_kinds[(m, "row")] += 1
            quarantine.append(
                record(
                    ids[row],
                    m,
                    srcs[row].get(m),
                    f"duplicate_of:{surv}",
                    "caption of a duplicate row",
                )
            )


def train_items(
    decoded: dict[str, list],
    ids: list[str],
    plan: dict[str, Any],
    groups: list[str | None],
    splits: list[str | None] | None = None,
) -> dict[str, list[Any]]:
    """The TRAIN split's kept decoded items of each fitted modality, sorted by row id.

    Args:
        decoded: ``{modality: stage-1 item or None per row}`` (rows aligned with ``ids``,
            in manifest order).
        ids: Row ids (``None`` for unparsable rows).
        plan: :func:`plan_rows`'s plan.
        groups: Row groups (``None``: the row is its own group).
        splits: The manifest's split per row (``None``: assigned by group).

    Returns:
        ``{modality: [item, ...]}`` in id order (deterministic whatever the block order).
    """
    drop_rows = set(plan["drop_rows"])
    drop_index = set(plan.get("drop_index", ()))
    splits = splits if splits is not None else [None] * len(ids)
    out: dict[str, list[Any]] = {}
    for m, items in decoded.items():
        picked = []
        for pos, (rid, grp, fix, item) in enumerate(zip(ids, groups, splits, items, strict=True)):
            if item is None or rid is None or rid in drop_rows or pos in drop_index:
                continue
            if m in plan["drop_mods"].get(rid, ()):
                continue
            if (fix or plan["group_split"].get(grp if grp is not None else rid)) != "train":
                continue
            picked.append((rid, item))
        out[m] = [item for _, item in sorted(picked, key=lambda p: p[0])]
    return out
