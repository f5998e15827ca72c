"""Evaluation metrics on plain numpy embeddings: retrieval R@K, zero-shot and head accuracy
(per-sample classification reports: balanced accuracy, per-class recall, confusion).

Everything here is framework-free (numpy/scipy only) so that it can be checked on hand-made
embeddings with known answers. Embeddings are compared by dot product; callers pass
L2-normalized vectors, which makes the score the cosine similarity.

Ties. Collapsed or quantized embeddings produce exactly equal scores, and a plain
``argsort`` would then reward or punish a query depending on gallery order. Recall here is
the *expected* recall under a uniformly random order among tied items, computed exactly
(hypergeometric), so it is deterministic, independent of gallery order, and a fully
collapsed model scores chance level instead of 0 or 1. Scores are rounded to
``tie_decimals`` decimals first so that float noise in the matmul does not split ties.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import permutations

import numpy as np
from scipy.special import gammaln

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)


def _log_comb(n: np.ndarray, r: np.ndarray) -> np.ndarray:
    """log C(n, r) elementwise; callers guarantee 0 <= r <= n."""
    return gammaln(n + 1.0) - gammaln(r + 1.0) - gammaln(n - r + 1.0)


def similarity(query: np.ndarray, gallery: np.ndarray, tie_decimals: int | None = 6) -> np.ndarray:
    """Dot-product scores, computed in float32 (embeddings are float32 anyway).

    Args:
        query: (Q, E) float embeddings.
        gallery: (G, E) float embeddings.
        tie_decimals: round scores to this many decimals (None: no rounding) so that
            numerically equal scores are treated as ties.

    Returns:
        (Q, G) float32 scores.
    """
    query = np.asarray(query, dtype=np.float32)
    gallery = np.asarray(gallery, dtype=np.float32)
    if query.ndim != 2 or gallery.ndim != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"query and gallery must be (Q, E) and (G, E); got {query.shape} and {gallery.shape}"
        )
    scores = query @ gallery.T
    if tie_decimals is not None:
        # In place: scale, round to integers, scale back; equal inputs stay exactly equal.
        scale = np.float32(10.0**tie_decimals)
        scores *= scale
        np.rint(scores, out=scores)
        scores /= scale
    return scores


def hits_at_ks(
    scores: np.ndarray, positives: np.ndarray, ks: Sequence[int]
) -> dict[int, np.ndarray]:
    """Expected hit@K per query under random tie-breaking, for several K at once.

    A query hits when at least one positive gallery item is among its K best-scored items.
    Only the best-scoring positive matters: with ``g`` items strictly above its score and
    ``n`` items tied with it (``p`` of them positive), the ``r = K - g`` remaining slots are
    filled uniformly from the tied block, so P(miss) = C(n - p, r) / C(n, r) (0 slots:
    sure miss). This needs no sort or partition: O(Q * G) for every K together.

    Args:
        scores: (Q, G) similarity scores.
        positives: (Q, G) bool, True where the gallery item counts as a correct answer.
        ks: cut-offs, each >= 1.

    Returns:
        ``{k: (Q,) float64 in [0, 1]}``; exactly 0/1 where no tie straddles the cut-off.
        Queries without any positive get 0.
    """
    scores = np.asarray(scores)
    if scores.dtype.kind != "f":
        scores = scores.astype(np.float64)
    positives = np.asarray(positives, dtype=bool)
    if scores.shape != positives.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and positives {positives.shape} must match")
    if any(k < 1 for k in ks):
        raise ValueError(f"k must be >= 1, got {list(ks)}")
    q = scores.shape[0]
    if q == 0 or scores.shape[1] == 0:
        return {k: np.zeros(q) for k in ks}
    has_pos = positives.any(axis=1)
    best = np.where(positives, scores, -np.inf).max(axis=1)  # (Q,) best positive score
    above = (scores > best[:, None]).sum(axis=1).astype(np.float64)
    tied = scores == best[:, None]
    n = tied.sum(axis=1).astype(np.float64)
    p = (tied & positives).sum(axis=1).astype(np.float64)
    out: dict[int, np.ndarray] = {}
    for k in ks:
        r = k - above  # slots left for the tied block
        can_miss = (r >= 1) & ((n - p) >= r)
        rr = np.clip(r, 0, None)
        log_miss = np.where(
            can_miss, _log_comb(n - p, np.minimum(rr, n - p)) - _log_comb(n, np.minimum(rr, n)), 0
        )
        hit = np.where(r < 1, 0.0, np.where(can_miss, 1.0 - np.exp(log_miss), 1.0))
        out[k] = np.where(has_pos, np.clip(hit, 0.0, 1.0), 0.0)
    return out


def hits_at_k(scores: np.ndarray, positives: np.ndarray, k: int) -> np.ndarray:
    """(Q,) expected hit@K; see :func:`hits_at_ks`."""
    return hits_at_ks(scores, positives, (k,))[k]


def recall_at_ks(
    scores: np.ndarray, positives: np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Mean expected hit@K over queries that have at least one positive.

    Returns:
        ``{"R@1": ..., "R@5": ..., "n_queries": Q'}`` (R values NaN-free; 0.0 when Q' = 0).
    """
    positives = np.asarray(positives, dtype=bool)
    valid = positives.any(axis=1)
    out: dict[str, float] = {}
    hits = hits_at_ks(scores[valid], positives[valid], ks)
    for k in ks:
        out[f"R@{k}"] = float(hits[k].mean()) if hits[k].size else 0.0
    out["n_queries"] = int(valid.sum())
    return out


def label_codes(labels: Sequence[str | None]) -> np.ndarray:
    """(N,) int64 code per label (sorted order), -1 where the label is None."""
    names = sorted({str(x) for x in labels if x is not None})
    index = {n: i for i, n in enumerate(names)}
    return np.asarray([-1 if x is None else index[str(x)] for x in labels], dtype=np.int64)


def label_positives(query_labels: Sequence[str | None], gallery_labels: Sequence[str | None]):
    """(Q, G) bool: same non-null label (category-level relevance, INTERFACES §7)."""
    codes = label_codes(list(query_labels) + list(gallery_labels))
    qc, gc = codes[: len(query_labels)], codes[len(query_labels) :]
    return (qc[:, None] == gc[None, :]) & (qc >= 0)[:, None]


def retrieval_metrics(
    query: np.ndarray,
    gallery: np.ndarray,
    labels: Sequence[str | None] | None = None,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    tie_decimals: int | None = 6,
    chunk_size: int = 1024,
) -> dict[str, object]:
    """Cross-modal retrieval where query row i and gallery row i come from the same sample.

    Queries are scored in chunks of ``chunk_size`` rows so memory stays O(chunk_size * N)
    instead of O(N^2) on large splits; the result does not depend on the chunk size.

    Args:
        query: (N, E) embeddings of the query modality.
        gallery: (N, E) embeddings of the gallery modality, row-aligned with ``query``.
        labels: (N,) label per row (None where unknown); enables category-level recall.
        ks: recall cut-offs.
        tie_decimals: see :func:`similarity`.
        chunk_size: queries scored at once.

    Returns:
        ``{"category": {"R@1", ..., "n_queries", "chance@1"} | None,
        "instance": {"R@1", ..., "n_queries", "chance@1"}, "gallery_size": N}``.
        ``chance@1`` is the expected R@1 of a random ranking.
    """
    if len(query) != len(gallery):
        raise ValueError(f"query ({len(query)}) and gallery ({len(gallery)}) must be row-aligned")
    n = len(query)
    with_labels = labels is not None and any(x is not None for x in labels)
    if with_labels and len(labels) != n:
        raise ValueError(f"labels ({len(labels)}) must have one entry per row ({n})")
    levels = ("instance", "category") if with_labels else ("instance",)
    codes = label_codes(labels) if with_labels else None
    sums = {lv: dict.fromkeys(ks, 0.0) for lv in levels}
    counts = dict.fromkeys(levels, 0)
    chance_sum = 0.0
    for s in range(0, n, max(1, chunk_size)):
        e = min(n, s + max(1, chunk_size))
        scores = similarity(query[s:e], gallery, tie_decimals)  # (c, N)
        pos = {"instance": np.zeros((e - s, n), dtype=bool)}
        pos["instance"][np.arange(e - s), np.arange(s, e)] = True
        if with_labels:
            qc = codes[s:e]
            pos["category"] = (qc[:, None] == codes[None, :]) & (qc >= 0)[:, None]
        for lv in levels:
            valid = pos[lv].any(axis=1)
            counts[lv] += int(valid.sum())
            hits = hits_at_ks(scores[valid], pos[lv][valid], ks)
            for k in ks:
                sums[lv][k] += float(hits[k].sum())
            if lv == "category" and valid.any():
                chance_sum += float(pos[lv][valid].mean(axis=1).sum())
    out: dict[str, object] = {"category": None, "gallery_size": n}
    for lv in levels:
        c = counts[lv]
        res: dict[str, float] = {f"R@{k}": (sums[lv][k] / c if c else 0.0) for k in ks}
        res["n_queries"] = c
        if lv == "instance":
            res["chance@1"] = 1.0 / n if n else 0.0
        else:
            res["chance@1"] = chance_sum / c if c else 0.0
        out[lv] = res
    return out


def pair_key(a: str, b: str) -> str:
    """The key of the ordered pair (query ``a``, gallery ``b``) in the results: ``"a->b"``."""
    return f"{a}->{b}"


def headline_r1(entry: dict) -> float:
    """Headline R@1 of a retrieval entry: category-level when labels exist, else instance."""
    level = entry.get("category") or entry["instance"]
    return float(level["R@1"])


def ordered_pairs(modalities: Sequence[str]) -> list[tuple[str, str]]:
    """Every ordered (query, gallery) pair of distinct modalities, in the given order."""
    return list(permutations(modalities, 2))


def normalize_pair(pair: str | Sequence[str]) -> frozenset[str]:
    """``"a-b"``, ``"a,b"``, ``["a", "b"]`` -> ``frozenset({"a", "b"})`` (modality names)."""
    if isinstance(pair, str):
        parts = [p.strip() for p in pair.replace(",", "-").replace(":", "-").split("-")]
    else:
        parts = [str(p).strip() for p in pair]
    parts = [p for p in parts if p]
    if len(parts) != 2 or parts[0] == parts[1]:
        raise ValueError(f"an aligned pair names two different modalities, got {pair!r}")
    return frozenset(parts)


def emergent_pairs(
    modalities: Sequence[str], aligned: Sequence[str | Sequence[str]]
) -> list[tuple[str, str]]:
    """Ordered pairs of ``modalities`` whose unordered pair never appears in ``aligned``."""
    seen = {normalize_pair(p) for p in aligned}
    return [(a, b) for a, b in ordered_pairs(modalities) if frozenset((a, b)) not in seen]


def class_embeddings(prompt_embeds: np.ndarray) -> np.ndarray:
    """Averages prompt embeddings over templates and re-normalizes.

    Args:
        prompt_embeds: (C, T, E) embeddings of C classes × T templates.

    Returns:
        (C, E) unit-norm class embeddings.
    """
    mean = np.asarray(prompt_embeds, dtype=np.float64).mean(axis=1)
    norm = np.linalg.norm(mean, axis=1, keepdims=True)
    return mean / np.maximum(norm, 1e-12)


def top1_accuracy(
    scores: np.ndarray, targets: Sequence[int] | np.ndarray, tie_decimals: int | None = 6
) -> dict[str, float]:
    """Expected top-1 accuracy of class scores, ties split uniformly; targets < 0 skipped.

    Args:
        scores: (N, C) class scores (logits or similarities).
        targets: (N,) class index, -1 (or any negative) where unknown.

    Returns:
        ``{"accuracy": float, "n": N'}``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if scores.ndim != 2 or len(scores) != len(targets):
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} do not match")
    valid = targets >= 0
    if not valid.any():
        return {"accuracy": 0.0, "n": 0}
    s = scores[valid]
    if tie_decimals is not None:
        s = np.round(s, tie_decimals)
    t = targets[valid]
    pos = np.zeros_like(s, dtype=bool)
    pos[np.arange(len(t)), t] = True
    acc = hits_at_k(s, pos, 1)
    return {"accuracy": float(acc.mean()), "n": int(valid.sum())}


def zero_shot_accuracy(
    embeds: np.ndarray,
    labels: Sequence[str | None],
    class_embeds: np.ndarray,
    class_names: Sequence[str],
    *,
    tie_decimals: int | None = 6,
) -> dict[str, float]:
    """Zero-shot classification: nearest class-prompt embedding.

    Args:
        embeds: (N, E) unit-norm sample embeddings.
        labels: (N,) label names (rows whose label is None or not a class are skipped).
        class_embeds: (C, E) unit-norm class embeddings (see :func:`class_embeddings`).
        class_names: (C,) names matching ``class_embeds`` rows.

    Returns:
        ``{"accuracy", "n", "chance"}``.
    """
    scores = similarity(embeds, class_embeds, tie_decimals)
    return class_score_accuracy(scores, labels, class_names, tie_decimals=None)


def class_score_accuracy(
    scores: np.ndarray,
    labels: Sequence[str | None],
    class_names: Sequence[str],
    *,
    tie_decimals: int | None = 6,
) -> dict[str, object]:
    """Per-sample classification report of class scores against label names.

    Args:
        scores: (N, C) class scores (head logits, or :func:`models.zeroshot.zero_shot_scores`).
        labels: (N,) label names (rows whose label is None or not a class are skipped).
        class_names: (C,) names matching the score columns.

    Returns:
        :func:`classification_report`'s dict.
    """
    index = {str(c): i for i, c in enumerate(class_names)}
    targets = np.asarray([index.get(str(x), -1) if x is not None else -1 for x in labels])
    return classification_report(scores, targets, class_names, tie_decimals=tie_decimals)


def classification_report(
    scores: np.ndarray,
    targets: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
    *,
    tie_decimals: int | None = 6,
) -> dict[str, object]:
    """Accuracy, balanced accuracy, per-class recall and the confusion matrix of class scores.

    A row whose best score is tied between ``k`` classes counts ``1/k`` for each of them
    (the expectation under random tie-breaking, as :func:`top1_accuracy`), so a collapsed
    model scores chance instead of whatever class comes first.

    Args:
        scores: (N, C) class scores.
        targets: (N,) true class index; negative where unknown (row skipped).
        class_names: (C,) names of the score columns.

    Returns:
        ``{"accuracy", "balanced_accuracy", "n", "chance", "per_class_recall": {name:
        recall | None}, "support": {name: rows}, "confusion": (C, C) list (rows = true
        class, columns = predicted; expected counts)}``. Balanced accuracy is the mean recall
        over the classes that have rows; a class without rows has recall None.
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    n_cls = len(class_names)
    if scores.ndim != 2 or len(scores) != len(targets) or scores.shape[1] != n_cls:
        raise ValueError(
            f"scores {scores.shape}, targets {targets.shape} and {n_cls} class names disagree"
        )
    valid = targets >= 0
    s, t = scores[valid], targets[valid]
    if tie_decimals is not None:
        s = np.round(s, tie_decimals)
    top = s == s.max(axis=1, keepdims=True) if len(s) else np.zeros((0, n_cls), bool)
    pred = top / np.maximum(top.sum(axis=1, keepdims=True), 1)  # (n, C) tie-split prediction
    conf = np.zeros((n_cls, n_cls))
    np.add.at(conf, t, pred)
    support = conf.sum(axis=1)
    recall = np.divide(np.diag(conf), support, out=np.zeros(n_cls), where=support > 0)
    n = int(valid.sum())
    return {
        "accuracy": float(np.trace(conf) / n) if n else 0.0,
        "balanced_accuracy": float(recall[support > 0].mean()) if n else 0.0,
        "n": n,
        "chance": 1.0 / n_cls if n_cls else 0.0,
        "per_class_recall": {
            str(c): (round(float(recall[i]), 6) if support[i] > 0 else None)
            for i, c in enumerate(class_names)
        },
        "support": {str(c): int(round(support[i])) for i, c in enumerate(class_names)},
        "confusion": np.round(conf, 4).tolist(),
    }
