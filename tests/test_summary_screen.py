"""The summary screens without a 15-minute demo: the emergent-alignment figure of the demo's
held-out pair, the per-sample accuracy table (``jobs.evaluate`` and the demo's summary,
label-only corpora included), ``per_class_recall.csv``, the targets, and the demo console's
line budget (< 80 lines, none over 300 characters) rebuilt from the session-8 transcript
with what the code prints now."""

from __future__ import annotations

import csv
import sys
from itertools import permutations
from pathlib import Path

import numpy as np
import pytest
import yaml

from jobs.demo.run import SUMMARY_EVAL_KEYS
from jobs.evaluation import metrics as M

ROOT = Path(__file__).resolve().parents[1]
TRANSCRIPT = ROOT / "benchmarks" / "results" / "demo_console_session8.txt"
MODS = ["text", "image", "audio", "video", "pointcloud", "signal", "tabular"]
CLASSES = [str(i) for i in range(10)]


def _demo_pairs() -> tuple[list[list[str]], list[list[str]]]:
    """The demo config's aligned and held-out pairs (what the export records)."""
    from jobs.training.config import load_train_config
    from jobs.training.runner import aligned_pairs, held_out_pairs

    tc = load_train_config(str(ROOT / "configs/train/demo_small.yaml"))
    return aligned_pairs(tc, MODS), held_out_pairs(tc, MODS)


def _retrieval() -> dict[str, dict]:
    """Session 8's shape: R@1 per ordered pair; audio<->pointcloud 0.715 / 0.891."""
    rng = np.random.default_rng(0)
    out = {}
    for a, b in permutations(MODS, 2):
        r1 = {("audio", "pointcloud"): 0.715, ("pointcloud", "audio"): 0.891}.get((a, b))
        if r1 is None:
            r1 = 0.4 if "tabular" in (a, b) else float(rng.uniform(0.8, 0.95))
        out[M.pair_key(a, b)] = {"category": {"R@1": r1}}
    return out


def _report(acc: float, n: int = 200, seed: int = 0) -> dict:
    """A classification report of ``n`` rows, about ``acc`` of them right."""
    rng = np.random.default_rng(seed)
    targets = np.arange(n) % len(CLASSES)
    scores = rng.normal(size=(n, len(CLASSES)))
    right = rng.random(n) < acc
    scores[right, targets[right]] += 10.0
    return M.classification_report(scores, targets, CLASSES)


def _result(label_only: bool = False) -> dict:
    from jobs.evaluation.run import _emergent

    aligned, held = _demo_pairs()
    retrieval = _retrieval()
    r1 = {k: M.headline_r1(v) for k, v in retrieval.items()}
    head = {m: _report(0.6 + 0.05 * i, seed=i) for i, m in enumerate(MODS)}
    em = _emergent(
        retrieval, MODS, aligned, "training.yaml", held, "held out in training (training.yaml)"
    )
    res = {
        "split": "test",
        "export": "/x/export",
        "n_rows": 200,
        "modalities": MODS,
        "retrieval_level": "category",
        "retrieval": retrieval,
        "retrieval_summary": {"level": "category", "R@1": r1},
        "mean_R@1": float(np.mean(list(r1.values()))),
        "emergent_alignment": em,
        "emergent": {k: em[k] for k in ("mean_R@1", "R@1", "selected_by") if k in em},
        "classification": {
            "class_names": CLASSES,
            "fused": _report(0.99, seed=99),
            "per_modality": head,
        },
        "zero_shot": {
            "class_names": CLASSES,
            "per_modality": {m: _report(0.55 + 0.05 * i, seed=10 + i) for i, m in enumerate(MODS)},
        },
        "fusion": {
            "modalities": MODS,
            "n": 59,
            "fused_accuracy": 1.0,
            "best_single_modality": "signal",
            "best_single_accuracy": 0.983,
            "fusion_gain": 0.017,
        },
        "skipped": {},
    }
    if label_only:
        res["zero_shot"] = {"skipped": "the model has no text branch to embed the prompts"}
    return res


def test_emergent_figure_is_the_held_out_pair_each_direction(tmp_path):
    from jobs.evaluation.data import EvaluationError, read_training_info
    from jobs.evaluation.report import compact_summary, emergent_line, format_summary
    from jobs.evaluation.run import _emergent

    aligned, held = _demo_pairs()
    assert held == [["audio", "pointcloud"]] and len(aligned) == 17
    em = _result()["emergent_alignment"]
    assert em["emergent_pairs"] == ["audio->pointcloud", "pointcloud->audio"]
    assert em["R@1"] == {"audio->pointcloud": 0.715, "pointcloud->audio": 0.891}
    assert em["mean_R@1"] == pytest.approx(0.803)
    # The tabular pairs never trained together either: reported apart, starred in tables.
    other = em["other_never_trained"]["R@1"]
    assert set(other) == {
        f"{a}->{b}"
        for p in (("audio", "tabular"), ("video", "tabular"), ("pointcloud", "tabular"))
        for a, b in (p, p[::-1])
    }
    assert len(em["never_trained_pairs"]) == 8
    line = emergent_line(em)
    assert "audio->pointcloud 0.715, pointcloud->audio 0.891, mean 0.803" in line
    assert "6 other pairs never trained together 0.400" in line
    assert line.startswith("emergent alignment R@1, held out in training (training.yaml): ")
    assert line in compact_summary(_result())
    assert format_summary(_result()).count("*") == 8 + 1  # 8 starred cells + the legend
    # Without a record of held-out pairs: every never-trained pair, as before.
    em_all = _emergent(_retrieval(), MODS, aligned, "training.yaml")
    assert len(em_all["emergent_pairs"]) == 8 and "other_never_trained" not in em_all
    assert em_all["selected_by"] == "every pair never trained together"
    assert emergent_line(em_all).startswith(
        "emergent alignment R@1, every pair never trained together: mean "
    )  # 8 directions: mean, lowest and highest (the metrics.json has each)
    assert "(lowest " in emergent_line(em_all) and len(emergent_line(em_all)) < 250
    # A "held-out" pair that was aligned is an error, not a figure.
    with pytest.raises(EvaluationError, match=r"image-text.\] \(config\) were aligned in training"):
        _emergent(_retrieval(), MODS, aligned, "t", [["image", "text"]], "config")
    # The export's training.yaml carries the held-out pairs to the evaluation.
    (tmp_path / "training.yaml").write_text(
        yaml.safe_dump({"aligned_pairs": aligned, "emergent_pairs": held})
    )
    info = read_training_info(tmp_path)
    assert info.emergent_pairs == [["audio", "pointcloud"]]
    assert info.source["emergent_pairs"] == "training.yaml"


@pytest.mark.parametrize("label_only", [False, True])
def test_accuracy_table_shows_head_and_zero_shot_per_sample(label_only):
    from jobs.evaluation.report import accuracy_table, compact_summary

    res = _result(label_only)
    lines = accuracy_table(res)
    assert lines[0].startswith("accuracy/balanced per sample")
    assert lines[0].endswith("(10 classes, chance 0.10)")
    assert "head" in lines[0] and "zero-shot" in lines[0] and "baseline" not in lines[0]
    rows = {ln.split()[0]: ln.split()[1:] for ln in lines[1:9]}
    assert list(rows) == ["fused", *MODS]
    cl = res["classification"]
    audio = cl["per_modality"]["audio"]
    assert rows["audio"][0] == f"{audio['accuracy']:.2f}/{audio['balanced_accuracy']:.2f}"
    assert rows["fused"][1] == "-"  # zero-shot has no fused row
    if label_only:
        assert all(r[1] == "-" for r in rows.values())
        assert lines[-1].strip() == (
            "zero-shot: skipped (the model has no text branch to embed the prompts)"
        )
    else:
        z = res["zero_shot"]["per_modality"]["audio"]
        assert rows["audio"][1] == f"{z['accuracy']:.2f}/{z['balanced_accuracy']:.2f}"
        assert len(lines) == 9
    # jobs.evaluate's console has it; --brief (the demo) leaves it to the summary screen.
    assert lines[0] in compact_summary(res)
    assert lines[0] not in compact_summary(res, table=False)
    # With the baselines: a last column and how many modalities match.
    base = {
        "per_modality": {m: {"accuracy": 0.7} for m in MODS},
        "comparison": {m: {"omniray_matches_baseline": m != "text"} for m in MODS},
    }
    lines = accuracy_table(res, base)
    assert lines[0].endswith("baseline  (10 classes, chance 0.10; OmniRay >= baseline on 6/7)")
    assert lines[2].split()[-1] == "0.70" and lines[1].split()[-1] == "-"  # text; fused
    assert accuracy_table({}) == []


def test_per_class_recall_csv(tmp_path):
    from jobs.evaluation.report import write_per_class_recall

    res = _result()
    path = write_per_class_recall(res, tmp_path / "per_class_recall.csv")
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["source", "modality", "n", "accuracy", "balanced_accuracy", *CLASSES]
    assert [r[:2] for r in rows[1:3]] == [["head", "fused"], ["head", "text"]]
    assert len(rows) == 1 + 8 + 7  # head: fused + 7; zero-shot: 7
    rep = res["zero_shot"]["per_modality"]["tabular"]
    assert rows[-1][:2] == ["zero-shot", "tabular"]
    assert float(rows[-1][5 + 3]) == pytest.approx(rep["per_class_recall"]["3"], abs=1e-4)
    assert write_per_class_recall({}, tmp_path / "none.csv") is None


def test_html_targets_name_the_pairs_and_show_recall_per_class(tmp_path):
    from jobs.demo.html_report import headline, target_label, write_html_report

    res = _result()
    h = headline(res)
    assert h["mean_r1"] == pytest.approx(res["mean_R@1"]) and h["emergent"] == pytest.approx(0.803)
    assert (
        target_label("mean_r1", res) == "mean R@1 over the 42 ordered pairs of 7 modalities present"
    )
    assert target_label("emergent", res, short=True) == (
        "emergent R@1: audio->pointcloud 0.715, pointcloud->audio 0.891; mean"
    )
    page = write_html_report({"steps": {}, "paths": {}}, tmp_path, metrics=res).read_text()
    assert "42 ordered pairs of 7 modalities present" in page
    assert "other pairs never trained together" in page and "audio-&gt;tabular" in page
    assert 'id="recall"' in page and page.count("<td>zero-shot</td>") == 7
    a = res["classification"]["per_modality"]["audio"]
    assert f"{a['accuracy']:.3f} / {a['balanced_accuracy']:.3f}" in page


def test_demo_steps_print_no_extra_done_line(tmp_path, capfd):
    from jobs.demo.run import Orchestrator, Step

    out = tmp_path / "out.txt"
    step = Step(
        "x",
        [sys.executable, "-c", f"open({str(out)!r}, 'w').write('1'); print('[x] done in 0s')"],
        inputs=[],
        outputs=[out],
        title="a step",
    )
    Orchestrator(tmp_path / "state", fresh=True, log_dir=tmp_path / "logs").run(step)
    lines = capfd.readouterr().out.splitlines()
    assert lines == ["[demo] x: a step", "[x] done in 0s"]
    assert "[x] done in" in (tmp_path / "logs" / "demo.log").read_text()


def test_demo_console_fits_the_line_budget():
    """The session-8 transcript with today's evaluate lines (``--brief``) and summary
    screen, without the ``[demo] <step>: done`` lines: < 80 lines, none over 300 chars."""
    from jobs.demo.run import format_report
    from jobs.evaluation.report import compact_summary

    res = _result()
    old = TRANSCRIPT.read_text().splitlines()
    assert old[0].endswith("-m jobs.demo --fresh ") and len(old) == 81
    base = {
        "per_modality": {m: {"accuracy": 0.7} for m in MODS},
        "comparison": {m: {"omniray_matches_baseline": True} for m in MODS},
    }
    examples = {
        f"search {m}{d}->image": {"top5_labels": [d] * 5, "true": d, "top1_right": True}
        for m, d in (("audio", "7"), ("text", "3"), ("video", "5"), ("pointcloud", "2"))
    }
    report = {
        "total_seconds": 889.0,
        "steps": {s: {"seconds": 60.0, "skipped": False} for s in ("corpus", "train", "serve")},
        "corpus": {"rows_read": 2000, "rows_written": 1992, "splits": {"test": 195}},
        "evaluation": {k: res[k] for k in SUMMARY_EVAL_KEYS},
        "baselines": "OmniRay/baseline accuracy ...",
        "baselines_result": base,
        "serving": {"examples": examples},
        "paths": {
            "export": "/work/main/runs/demo/export",
            "plots": ["a.png"] * 25,
            "html": "/work/main/reports/index.html",
        },
    }
    new: list[str] = []
    in_eval = False
    for line in old:
        if line.startswith("=" * 30):
            break  # the summary screen: today's below
        steps = ("corpus", "prepare", "train", "evaluate", "baselines")
        if any(line.startswith(f"[demo] {s}: done in") for s in steps):
            continue  # test_demo_steps_print_no_extra_done_line
        if line.startswith("[evaluate] /"):
            new.append(line)
            new += [f"[evaluate] {x}" for x in compact_summary(res, table=False)]
            in_eval = True
            continue
        if in_eval and not line.startswith("[evaluate] done"):
            continue
        in_eval = False
        new.append(line)
    summary = format_report(report).splitlines()
    assert sum(ln.startswith(("    fused", "    tabular")) for ln in summary) == 2
    screen = new + summary
    print("\n".join(screen))
    assert len(screen) < 80, len(screen)
    assert max(len(ln) for ln in screen) <= 300
