"""The driver's decisions of ``prepare``, from the small per-row keys of stage 1 (no Ray).

:func:`plan_rows` refuses duplicate ids, finds exact and near duplicates per modality
(each modality by its featurizer's method), drops the captions of duplicated rows, and
assigns groups to splits (:func:`split_groups`) and rows to shards.
:func:`train_items` gathers the TRAIN split's decoded items a fitted featurizer learns from.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections import Counter, defaultdict
from typing import Any

from pipelines.config import DataConfig
from pipelines.dedupe import find_duplicates, find_near_duplicates, near_modalities
from pipelines.featurize import FEATURIZERS
from pipelines.schema import SPLITS
from pipelines.stages import pipeline_modalities, record
from pipelines.stats import with_total

__all__ = ["plan_rows", "split_groups", "train_items"]


def split_groups(group_rows: dict[str, int], config: DataConfig) -> dict[str, str]:
    """Assigns every group to a split, deterministically.

    Groups are ordered by a salted hash of their name; val and then test take groups
    in that order until they hold their share of rows (at least one group each when
    there are >= 3 groups and the ratio is > 0), train takes the rest.

    Args:
        group_rows: ``{group: kept rows}``.
        config: Data config (``split`` section).

    Returns:
        ``{group: "train" | "val" | "test"}``.
    """
    s = config.split
    order = sorted(
        group_rows,
        key=lambda g: hashlib.blake2b(f"{s.salt}\0{g}".encode(), digest_size=8).digest(),
    )
    total = sum(group_rows.values())
    out: dict[str, str] = {}
    i = 0
    for split, ratio in (("val", s.val), ("test", s.test)):
        target = ratio * total
        taken = 0
        first = True
        while i < len(order) and ratio > 0:
            need_one = first and len(order) >= 3
            if not need_one and taken + group_rows[order[i]] / 2 > target:
                break
            out[order[i]] = split
            taken += group_rows[order[i]]
            i += 1
            first = False
    for g in order[i:]:
        out[g] = "train"
    return out


def plan_rows(
    keys: dict[str, list], cfg: DataConfig
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """Driver-side decisions from per-row keys: drops, duplicates, splits, shards.

    Returns:
        ``(plan, quarantine records sorted, info)``; ``plan`` holds ``drop_rows``,
        ``drop_mods``, ``group_split``, ``num_shards``, ``kept``, ``split_rows``.
    """
    n = len(keys["id"])
    quarantine: list[dict[str, Any]] = []
    ignored = sorted({c for u in keys["_unknown"] if u for c in u})
    for q in keys["_quarantine"]:
        if q:
            quarantine.extend(json.loads(q))
    row_ok = [keys["_row_error"][i] is None for i in range(n)]
    for i in range(n):
        if not row_ok[i]:
            quarantine.append(json.loads(keys["_row_error"][i]))

    # Duplicate ids are ambiguous (which row is meant?): every such row is refused.
    id_count = Counter(keys["id"][i] for i in range(n) if row_ok[i])
    dup_ids = {k for k, c in id_count.items() if c > 1}
    for i in range(n):
        if row_ok[i] and keys["id"][i] in dup_ids:
            row_ok[i] = False
            quarantine.append(
                record(
                    keys["id"][i],
                    None,
                    None,
                    "duplicate_id",
                    f"id appears {id_count[keys['id'][i]]} times",
                )
            )

    valid = [i for i in range(n) if row_ok[i]]
    ids = keys["id"]
    present = {i: set(keys["_present"][i] or ()) for i in valid}
    srcs = {i: json.loads(keys["_src"][i]) for i in valid}
    dropped_mods: dict[int, dict[str, str]] = defaultdict(dict)  # row -> {m: survivor id}
    dup_kinds: Counter = Counter()
    d = cfg.dedupe
    mods_all = pipeline_modalities()
    near = set(near_modalities(d))
    for m in mods_all:
        items = [i for i in valid if m in present[i]]
        if not items:
            continue
        use_exact, use_near = m in d.exact, m in near
        if not (use_exact or use_near):
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

    drop_rows: set[str] = set(dup_ids)
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

    group_rows: Counter = Counter()
    for i in kept_mods:
        group_rows[keys["group"][i] or ids[i]] += 1
    group_split = split_groups(dict(group_rows), cfg)
    split_rows = Counter()
    for g, c in group_rows.items():
        split_rows[group_split[g]] += c
    num_shards = {
        s: (math.ceil(split_rows[s] / cfg.rows_per_shard) if split_rows[s] else 0) for s in SPLITS
    }

    combos: dict[str, Counter] = defaultdict(Counter)
    pairs: dict[str, Counter] = defaultdict(Counter)
    per_mod: dict[str, Counter] = defaultdict(Counter)
    for i, have in kept_mods.items():
        split = group_split[keys["group"][i] or ids[i]]
        combos["+".join(have)][split] += 1
        for a, b in itertools.combinations(have, 2):
            pairs[f"{a}-{b}"][split] += 1
        for m in have:
            per_mod[m][split] += 1
    quarantine.sort(key=lambda r: (r["id"] or "", r["modality"] or "", r["reason"], r["detail"]))
    plan = {
        "drop_rows": sorted(drop_rows),
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
        "groups": {s: sorted(g for g, sp in group_split.items() if sp == s) for s in SPLITS},
    }
    return plan, quarantine, info


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
    """Drops the captions (modalities with a ``caption_key``) of wholly duplicated rows.

    A row whose every other modality is a duplicate of the same survivor row loses its
    caption too when the caption's key equals the survivor's (a new caption of
    duplicated content is new information and stays).
    """
    index_of = {ids[i]: i for i in valid}
    for row, mods in dropped_mods.items():
        caps = {m for m in present[row] if m not in mods and keys[f"_caption_{m}"][row] is not None}
        others = present[row] - caps
        if not caps or not others or not others <= set(mods):
            continue
        survivors = {mods[m] for m in others}
        if len(survivors) != 1:
            continue
        surv = survivors.pop()
        for m in sorted(caps):
            if keys[f"_caption_{m}"][index_of[surv]] != keys[f"_caption_{m}"][row]:
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
    decoded: dict[str, list], ids: list[str], plan: dict[str, Any], groups: list[str | None]
) -> dict[str, list[Any]]:
    """The TRAIN split's kept decoded items of each fitted modality, sorted by row id.

    Args:
        decoded: ``{modality: stage-1 item or None per row}`` (rows aligned with ``ids``).
        ids: Row ids (``None`` for unparsable rows).
        plan: :func:`plan_rows`'s plan.
        groups: Row groups (``None``: the row is its own group).

    Returns:
        ``{modality: [item, ...]}`` in id order (deterministic whatever the block order).
    """
    drop_rows = set(plan["drop_rows"])
    out: dict[str, list[Any]] = {}
    for m, items in decoded.items():
        picked = []
        for rid, grp, item in zip(ids, groups, items, strict=True):
            if item is None or rid is None or rid in drop_rows:
                continue
            if m in plan["drop_mods"].get(rid, ()):
                continue
            if plan["group_split"].get(grp if grp is not None else rid) != "train":
                continue
            picked.append((rid, item))
        out[m] = [item for _, item in sorted(picked, key=lambda p: p[0])]
    return out
