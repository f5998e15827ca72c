"""Train/val/test assignment of ``prepare`` (driver side, no Ray).

A row's split is, in order: its manifest ``split`` column (``train``/``val``/``test``), the
split its group's fixed rows have, or the split :func:`assign_groups` deals its group into.
Dealing is per label stratum (the label of most of a group's rows; label-less and
many-class groups form one stratum), so every class with a few groups reaches every split;
groups are visited in the order of a salted hash of their name, so the assignment is
deterministic and changes only with ``split.salt``. :func:`split_warnings` lists what a user
must hear about: an empty split, a split without classes train has, classes only outside
train.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping

from pipelines.config import SplitConfig
from pipelines.schema import SPLITS

__all__ = ["assign_groups", "parse_split", "split_groups", "split_warnings"]

#: Order in which a stratum's first groups go to still empty splits: a class must be
#: trained on first, then tested, then validated.
_PRIORITY: tuple[str, ...] = ("train", "test", "val")


def parse_split(value: str) -> str | None:
    """A manifest ``split`` value -> ``train``/``val``/``test`` (``None``: not one of them)."""
    v = value.strip().lower()
    return v if v in SPLITS else None


def _hash_order(groups: Iterable[str], salt: str) -> list[str]:
    return sorted(
        groups, key=lambda g: hashlib.blake2b(f"{salt}\0{g}".encode(), digest_size=8).digest()
    )


def assign_groups(
    group_rows: Mapping[str, int],
    split: SplitConfig,
    labels: Mapping[str, str | None] | None = None,
    fixed: Mapping[str, Mapping[str, int]] | None = None,
) -> dict[str, str]:
    """Assigns every group to a split, deterministically, stratified by label.

    Per stratum (the groups whose main label is one class; ``labels`` missing or
    ``split.stratify`` off: one stratum for all), rows already in a split (the fixed ones)
    count toward its share. In hash order, the stratum's first groups go to each split that
    is still empty, has a ratio > 0 and should hold at least half a row (train, then test,
    then val); every further group goes to the split furthest below its share
    (``ratio * stratum rows``; ties: train, val, test).

    Args:
        group_rows: ``{group: kept rows}`` (fixed rows included).
        split: The ``split`` section (ratios, salt, stratify).
        labels: ``{group: main label or None}``.
        fixed: ``{group: {split: rows the manifest fixed}}`` for groups with fixed rows; the
            group (its other rows) follows its most common fixed split.

    Returns:
        ``{group: "train" | "val" | "test"}``.
    """
    ratios = {"train": split.train, "val": split.val, "test": split.test}
    labels = labels if (labels is not None and split.stratify) else {}
    fixed = fixed or {}
    out: dict[str, str] = {}
    have: dict[str | None, Counter] = defaultdict(Counter)  # stratum -> rows per split
    strata: dict[str | None, list[str]] = defaultdict(list)
    for g in _hash_order(group_rows, split.salt):
        stratum = labels.get(g)
        f = fixed.get(g)
        if f:
            # Most rows fixed there; ties: train, val, test.
            out[g] = max(SPLITS, key=lambda s: (f.get(s, 0), -SPLITS.index(s)))
            for s, n in f.items():
                have[stratum][s] += n
            have[stratum][out[g]] += group_rows[g] - sum(f.values())
        else:
            strata[stratum].append(g)
    for stratum, groups in strata.items():
        got = have[stratum]
        total = sum(got.values()) + sum(group_rows[g] for g in groups)
        i = 0
        for s in _PRIORITY:
            if i == len(groups) or got[s] or ratios[s] <= 0 or ratios[s] * total < 0.5:
                continue
            out[groups[i]] = s
            got[s] += group_rows[groups[i]]
            i += 1
        for g in groups[i:]:
            s = max(SPLITS, key=lambda s: (ratios[s] * total - got[s], -SPLITS.index(s)))
            out[g] = s
            got[s] += group_rows[g]
    return out


def split_groups(group_rows: dict[str, int], config: object) -> dict[str, str]:
    """:func:`assign_groups` without labels or fixed rows (``config``: a DataConfig)."""
    return assign_groups(group_rows, config.split)


def split_warnings(
    split_rows: Mapping[str, int],
    split_labels: Mapping[str, Counter],
    split: SplitConfig,
    max_names: int = 8,
) -> list[str]:
    """One line per problem of the final split: an empty split whose ratio is > 0, a val/test
    split that lacks classes train has, classes that appear only outside train.

    Args:
        split_rows: ``{split: rows written}``.
        split_labels: ``{split: Counter(label -> rows)}`` (labelled rows only).
        split: The ``split`` section (its ratios).
        max_names: Classes named per line at most.
    """

    def names(xs: set[str]) -> str:
        xs_sorted = sorted(xs)
        more = f" and {len(xs_sorted) - max_names} more" if len(xs_sorted) > max_names else ""
        return ", ".join(xs_sorted[:max_names]) + more

    ratios = {"train": split.train, "val": split.val, "test": split.test}
    out = []
    for s in SPLITS:
        if not split_rows.get(s) and ratios[s] > 0:
            out.append(
                f"{s} split is empty (split.{s}={ratios[s]:g}): too few groups, or every row's "
                "split column names another split"
            )
    train = set(split_labels.get("train", ()))
    for s in ("val", "test"):
        here = set(split_labels.get(s, ()))
        if not split_rows.get(s):
            continue
        if train - here:
            out.append(
                f"{s} split lacks {len(train - here)} of the {len(train)} classes in train: "
                f"{names(train - here)}"
            )
        if here - train:
            out.append(f"{s} split has classes train never sees: {names(here - train)}")
    return out
