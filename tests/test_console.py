"""The jobs' quiet console (jobs.console), the training plots and the baseline features."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import os, sys, logging, time
from jobs.console import quiet_console, say, Progress, ray_data_progress
with quiet_console("job", sys.argv[1]):
    print("chatter from print")
    print("chatter on stderr", file=sys.stderr)
    os.system("echo chatter from a subprocess")
    logging.getLogger("ray.train").warning("a placement group warning")
    say("[job] step one")
    with Progress("stage", 10, prefix="[job]", interval_s=0.0) as bar:
        for i in (5, 10):
            bar.update_to(i, loss=1.0 / i, samples_per_s=12.0)
    lg = logging.getLogger("ray.data._internal.progress.logging_progress")
    ex = logging.getLogger("ray.data._internal.execution.streaming_executor")
    with ray_data_progress("[job]"):
        lg.info("======= Running Dataset: ds_1 =======")
        lg.info("Total Progress: 40/100")
        ex.info("Dataset ds_1 execution finished in 1.50 seconds")
    if len(sys.argv) > 2:
        raise RuntimeError("boom\nsecond line")
"""


def _run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    log = tmp_path / "logs" / "job.log"
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(log), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


def test_quiet_console_sends_chatter_to_the_log(tmp_path):
    r = _run(tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("[job] log: ") and lines[0].endswith("job.log")
    assert "[job] step one" in lines
    # Not a terminal: one summary line per update (interval 0) and one at the end.
    stage = [ln for ln in lines if ln.startswith("[job] stage ")]
    assert stage[0].startswith("[job] stage 5/10 (50%) loss 0.2 samples_per_s 12")
    assert "ETA" in stage[0] and stage[-1].startswith("[job] stage 10/10 (100%)")
    data = [ln for ln in lines if "Ray Data" in ln]
    assert data and "100/100" in data[-1] and "finished in 1.50 seconds" in data[-1]
    assert "chatter" not in r.stdout + r.stderr and "placement" not in r.stdout + r.stderr
    log = (tmp_path / "logs" / "job.log").read_text()
    for chatter in (
        "chatter from print",
        "chatter on stderr",
        "chatter from a subprocess",
        "[job] step one",
    ):
        assert chatter in log
    assert all(len(ln) <= 300 for ln in lines)


def test_quiet_console_failure_is_one_line_and_keeps_the_traceback(tmp_path):
    r = _run(tmp_path, "fail")
    assert r.returncode == 1
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert err == [
        f"[job] failed: RuntimeError: boom second line (traceback: {tmp_path}/logs/job.log)"
    ]
    assert "Traceback" in (tmp_path / "logs" / "job.log").read_text()


def test_console_without_redirection_prints_to_stdout(capsys, tmp_path):
    from jobs.console import quiet_console, say

    with quiet_console("x", tmp_path / "x.log"):  # capsys replaced sys.stdout: no redirection
        say("hello")
    assert capsys.readouterr().out == "hello\n"
    assert not (tmp_path / "x.log").exists()


def _records():
    rng = np.random.default_rng(0)
    recs = [{"event": "start", "stage": "align"}]
    for s in range(5, 101, 5):
        recs.append(
            {
                "stage": "align",
                "step": s,
                "loss": 10.0 / s,
                "loss/nce_text_image": 3.0 / s,
                "loss/nce_text_audio": 2.0 / s,
                "loss/xrecon_image": 100.0 / s**2,
                "loss/caption_image": 1.0,
                "loss/moe_aux": 0.01,
                "gates": {"image": 0.4 + 0.01 * rng.random(), "audio": 0.6},
                "expert_load_layers": {
                    "image": rng.dirichlet(np.ones(4), 3).tolist(),
                    "audio": rng.dirichlet(np.ones(4), 3).tolist(),
                },
            }
        )
    return recs


def test_training_plots(tmp_path):
    from jobs.training.plots import (
        _panels,
        expert_load_heatmap,
        gate_weights,
        loss_series,
        loss_small_multiples,
        smooth,
    )

    recs = _records()
    panels = _panels(loss_series(recs, "align"))
    titles = [t for t, _ in panels]
    assert titles == [
        "total loss",
        "InfoNCE text_audio",
        "InfoNCE text_image",
        "cross-modal reconstruction",
        "translation (caption)",
        "MoE balance",
    ]
    y = np.array([1.0, 3.0, 2.0, 5.0, 4.0])
    s = smooth(y, frac=0.5)
    assert s.shape == y.shape and s[0] == y[0] and np.ptp(s) < np.ptp(y)
    for fn, name in ((expert_load_heatmap, "el"), (gate_weights, "g")):
        out = fn(recs, str(tmp_path / f"{name}.png"))
        assert out and Path(out).read_bytes()[:4] == b"\x89PNG"
    assert loss_small_multiples(recs, "align", str(tmp_path / "l.png"))
    assert loss_small_multiples(recs, "finetune", str(tmp_path / "f.png")) is None
    assert expert_load_heatmap([], str(tmp_path / "n.png")) is None


def test_baseline_features():
    from benchmarks.baselines import featurize_split, pointcloud_features

    text = [np.array([5, 6, 6], np.int32), None, np.array([1], np.int32)]
    rows, X, _, vocab = featurize_split(text, "text")
    assert rows.tolist() == [0, 2] and vocab == 7 and X[0, 6] == 2 and X[1, 1] == 1
    # Unseen test tokens are clipped into the train vocabulary.
    _, Xt, _, _ = featurize_split([np.array([9], np.int32)], "text", None, vocab)
    assert Xt.shape == (1, 7)
    audio = [np.ones((5, 4), np.float16), np.ones((9, 4), np.float16)]
    _, Xa, length, _ = featurize_split(audio, "audio")
    assert length == 9 and Xa.shape == (2, 36) and Xa[0, 20:].sum() == 0
    pts = np.random.default_rng(0).uniform(-1, 1, (64, 3))
    f = pointcloud_features(pts)
    assert f.shape == (12 * 3 + 64 + 12,) and np.isclose(f[:12].sum(), 1.0)
    assert json.dumps(float(f.sum()))  # plain floats
    logging.getLogger(__name__).info("ok")
