"""Evaluation metrics on hand-made embeddings with known answers (no model, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.evaluation import metrics as M


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_perfect_alignment_gives_recall_one():
    rng = np.random.default_rng(0)
    x = _unit(rng.normal(size=(40, 16)))
    labels = [str(i % 4) for i in range(40)]
    res = M.retrieval_metrics(x, x.copy(), labels, ks=(1, 5, 10))
    for level in ("category", "instance"):
        assert res[level]["R@1"] == 1.0
        assert res[level]["R@10"] == 1.0
        assert res[level]["n_queries"] == 40
    assert res["gallery_size"] == 40


def test_random_embeddings_are_near_chance():
    rng = np.random.default_rng(1)
    n, classes = 400, 5
    q = _unit(rng.normal(size=(n, 32)))
    g = _unit(rng.normal(size=(n, 32)))
    labels = [str(i % classes) for i in range(n)]
    res = M.retrieval_metrics(q, g, labels, ks=(1, 10))
    assert abs(res["instance"]["R@1"] - 1 / n) < 0.01
    assert abs(res["instance"]["R@10"] - 10 / n) < 0.03
    assert abs(res["category"]["R@1"] - res["category"]["chance@1"]) < 0.06
    assert res["category"]["chance@1"] == pytest.approx(1 / classes, abs=0.01)


def test_reversed_ranking_gives_zero():
    # Query i's best match is the item with the other label: R@1 must be 0.
    q = np.array([[1.0, 0.0], [0.0, 1.0]])
    g = np.array([[0.0, 1.0], [1.0, 0.0]])
    res = M.retrieval_metrics(q, g, ["a", "b"], ks=(1, 2))
    assert res["instance"]["R@1"] == 0.0
    assert res["category"]["R@1"] == 0.0
    assert res["instance"]["R@2"] == 1.0


def test_ties_are_deterministic_and_order_independent():
    # A fully collapsed model: every score ties. Expected recall = chance, exactly,
    # whatever the gallery order (a plain argsort would return 0 or 1 by position).
    n = 12
    x = np.ones((n, 4)) / 2.0
    labels = [str(i % 3) for i in range(n)]
    res = M.retrieval_metrics(x, x, labels, ks=(1, 5))
    assert res["instance"]["R@1"] == pytest.approx(1 / n)
    assert res["instance"]["R@5"] == pytest.approx(5 / n)
    assert res["category"]["R@1"] == pytest.approx(4 / 12)
    # P(no positive in 5 draws from 12 with 4 positives) = C(8,5)/C(12,5)
    assert res["category"]["R@5"] == pytest.approx(1 - 56 / 792)
    perm = np.random.default_rng(0).permutation(n)
    res2 = M.retrieval_metrics(x[perm], x[perm], [labels[i] for i in perm], ks=(1, 5))
    assert res2 == res


def test_partial_tie_at_cutoff():
    # Scores for one query: positive tied with one negative at rank 1 -> R@1 = 0.5.
    scores = np.array([[0.9, 0.9, 0.1]])
    pos = np.array([[True, False, False]])
    assert M.hits_at_k(scores, pos, 1)[0] == pytest.approx(0.5)
    assert M.hits_at_k(scores, pos, 2)[0] == 1.0
    # A strictly better positive is a sure hit even when lower items tie.
    scores = np.array([[0.95, 0.9, 0.9]])
    assert M.hits_at_k(scores, pos, 1)[0] == 1.0


def test_near_equal_scores_count_as_ties():
    # Float noise below tie_decimals must not decide the ranking.
    q = np.array([[1.0, 0.0]])
    g = np.array([[1.0, 1e-9], [1.0, 0.0]])
    s = M.similarity(q, g, tie_decimals=6)
    assert s[0, 0] == s[0, 1]
    # ... so the positive (index 1) tied with a negative gets half credit, not 0 or 1.
    pos = np.array([[False, True]])
    assert M.hits_at_k(s, pos, 1)[0] == pytest.approx(0.5)


def test_unknown_labels_are_excluded_from_category_queries():
    x = np.eye(4)
    res = M.retrieval_metrics(x, x, ["a", None, "a", "b"], ks=(1,))
    assert res["category"]["n_queries"] == 3
    assert res["instance"]["n_queries"] == 4
    assert M.retrieval_metrics(x, x, [None] * 4)["category"] is None


def test_k_larger_than_gallery_and_bad_inputs():
    x = np.eye(3)
    assert M.retrieval_metrics(x, x, ks=(10,))["instance"]["R@10"] == 1.0
    with pytest.raises(ValueError, match="row-aligned"):
        M.retrieval_metrics(x, x[:2])
    with pytest.raises(ValueError, match="k must be"):
        M.hits_at_k(np.zeros((1, 2)), np.zeros((1, 2), bool), 0)
    with pytest.raises(ValueError, match=r"\(Q, E\)"):
        M.similarity(np.zeros((2, 3)), np.zeros((2, 4)))


def test_pairs_and_emergent_pairs():
    mods = ["text", "image", "audio", "signal"]
    pairs = M.ordered_pairs(mods)
    assert len(pairs) == 12 and ("image", "text") in pairs and ("text", "text") not in pairs
    em = M.emergent_pairs(mods, ["text-image", ["audio", "text"], "signal,text"])
    assert set(em) == {
        ("image", "audio"),
        ("audio", "image"),
        ("image", "signal"),
        ("signal", "image"),
        ("audio", "signal"),
        ("signal", "audio"),
    }
    assert M.emergent_pairs(mods, []) == pairs
    with pytest.raises(ValueError, match="two different"):
        M.normalize_pair("text-text")
    with pytest.raises(ValueError, match="two different"):
        M.normalize_pair("text")


def test_zero_shot_and_top1():
    cls = np.eye(3)
    emb = np.array([[1.0, 0.1, 0.0], [0.0, 0.9, 0.2], [0.2, 0.0, 1.0], [0.0, 1.0, 0.0]])
    emb = _unit(emb)
    res = M.zero_shot_accuracy(emb, ["a", "b", "c", "a"], cls, ["a", "b", "c"])
    assert {k: res[k] for k in ("accuracy", "n", "chance")} == {
        "accuracy": 0.75,
        "n": 4,
        "chance": pytest.approx(1 / 3),
    }
    assert res["balanced_accuracy"] == pytest.approx((0.5 + 1 + 1) / 3)
    # Unknown labels are skipped, not counted as errors.
    res = M.zero_shot_accuracy(emb, ["a", "zzz", None, "b"], cls, ["a", "b", "c"])
    assert res["n"] == 2 and res["accuracy"] == 1.0
    # Tied logits split credit.
    assert M.top1_accuracy(np.array([[1.0, 1.0]]), [0])["accuracy"] == 0.5
    assert M.top1_accuracy(np.zeros((2, 2)), [-1, -1]) == {"accuracy": 0.0, "n": 0}


def test_class_embeddings_average_templates():
    pe = np.array([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [2.0, 0.0]]])
    ce = M.class_embeddings(pe)
    np.testing.assert_allclose(ce[0], [2**-0.5, 2**-0.5])
    np.testing.assert_allclose(ce[1], [1.0, 0.0])


def test_chunked_scoring_matches_single_pass():
    rng = np.random.default_rng(3)
    q = _unit(rng.normal(size=(37, 8)))
    g = _unit(q + 0.8 * rng.normal(size=(37, 8)))
    labels = [str(i % 3) if i % 5 else None for i in range(37)]
    full = M.retrieval_metrics(q, g, labels, ks=(1, 5), chunk_size=1000)
    for cs in (1, 7, 36):
        part = M.retrieval_metrics(q, g, labels, ks=(1, 5), chunk_size=cs)
        for lv in ("instance", "category"):
            for key, v in full[lv].items():
                assert part[lv][key] == pytest.approx(v), (cs, lv, key)
    assert 0.0 < full["instance"]["R@1"] < 1.0  # a non-trivial case


def _brute_force_hit(scores: np.ndarray, pos: np.ndarray, k: int) -> float:
    """Exact expectation over every tie-breaking order (all G! permutations)."""
    from itertools import permutations

    g = len(scores)
    hits = []
    for perm in permutations(range(g)):
        order = sorted(range(g), key=lambda j: (-scores[j], perm[j]))
        hits.append(any(pos[j] for j in order[:k]))
    return float(np.mean(hits))


def test_expected_hits_match_brute_force_over_tie_orders():
    rng = np.random.default_rng(7)
    for _ in range(40):
        g = int(rng.integers(1, 7))
        scores = rng.integers(0, 3, size=(1, g)).astype(float)  # many ties
        pos = rng.random((1, g)) < 0.35
        got = M.hits_at_ks(scores, pos, (1, 2, 3, 6))
        for k in (1, 2, 3, 6):
            want = _brute_force_hit(scores[0], pos[0], k) if pos.any() else 0.0
            assert got[k][0] == pytest.approx(want, abs=1e-9), (scores, pos, k)


def test_classification_report_on_an_imbalanced_set():
    """9 rows of class a (all right), 1 of b (wrong): accuracy 0.9, balanced 0.5."""
    names = ["a", "b", "c"]
    scores = np.zeros((10, 3))
    scores[:9, 0] = 1.0  # a -> a
    scores[9, 2] = 1.0  # b -> c
    targets = [0] * 9 + [1]
    rep = M.classification_report(scores, targets, names)
    assert rep["accuracy"] == pytest.approx(0.9) and rep["n"] == 10
    assert rep["balanced_accuracy"] == pytest.approx(0.5)  # mean of recall a=1, b=0 (c: none)
    assert rep["per_class_recall"] == {"a": 1.0, "b": 0.0, "c": None}
    assert rep["support"] == {"a": 9, "b": 1, "c": 0}
    assert rep["confusion"] == [[9, 0, 0], [0, 0, 1], [0, 0, 0]]
    # Agrees with sklearn where there are no ties.
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix

    pred = scores.argmax(1)
    assert rep["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(targets, pred))
    np.testing.assert_array_equal(
        rep["confusion"], confusion_matrix(targets, pred, labels=[0, 1, 2])
    )
    # A tie between two classes splits the row: accuracy and confusion agree with top1.
    tied = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    rep = M.classification_report(tied, [0, -1], names)
    assert rep["n"] == 1 and rep["accuracy"] == 0.5 == M.top1_accuracy(tied, [0, -1])["accuracy"]
    assert rep["confusion"][0] == [0.5, 0.5, 0.0]
    with pytest.raises(ValueError, match="class names"):
        M.classification_report(tied, [0, 1], ["a", "b"])


def test_format_classification_block_for_a_summary_screen():
    """jobs.evaluation.report.format_classification: the head's accuracy / balanced
    accuracy per panel, recall per class and zero-shot; missing sections give no lines."""
    from jobs.evaluation.report import format_classification

    names = ["a", "b", "c"]
    scores = np.zeros((10, 3))
    scores[:9, 0] = 1.0
    scores[9, 2] = 1.0
    rep = M.classification_report(scores, [0] * 9 + [1], names)
    result = {
        "classification": {"class_names": names, "fused": rep, "per_modality": {"image": rep}},
        "zero_shot": {"class_names": names, "per_modality": {"image": rep}},
    }
    lines = format_classification(result)
    assert lines[0].startswith("classification head, per sample (3 classes, chance 0.333)")
    assert "fused" in lines[1] and "0.900 / 0.500  (n=10)" in lines[1]
    assert lines[2].split()[0] == "image" and "0.900 / 0.500" in lines[2]
    assert lines[3].strip() == "recall per class (fused): a 1.00, b 0.00"
    assert lines[4] == "zero-shot accuracy/balanced (3 classes): image 0.900/0.500"
    assert format_classification({}) == []
    skipped = {"classification": {"skipped": "no labels"}, "zero_shot": {"skipped": "no text"}}
    assert format_classification(skipped) == [
        "classification head: skipped (no labels)",
        "zero-shot: skipped (no text)",
    ]
