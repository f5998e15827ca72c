"""The demo's HTML report (``reports/index.html``) loaded in a real headless Chromium.

Inputs are data this repo did not write: an sklearn digits image, espeak-ng speech, and a
point cloud / signal / video made with open3d-free numpy (rendered by the report). The page
is loaded with ``chromium --headless --dump-dom --screenshot``; the test asserts the
sections, that every image decoded in the browser, the audio player, and keeps the
screenshot under ``reports/test_artifacts/`` (its path is printed).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "reports" / "test_artifacts"


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _corpus(root: Path) -> dict[str, dict]:
    """A three-row corpus of real inputs: digits images, espeak-ng speech, a PLY, an NPY."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    (root / "images").mkdir(parents=True)
    (root / "audio").mkdir()
    (root / "points").mkdir()
    (root / "signals").mkdir()
    rows = {}
    for i, label in enumerate((7, 7, 2)):
        idx = int(np.flatnonzero(digits.target == label)[i])
        img = (digits.images[idx] / 16.0 * 255).astype(np.uint8)
        Image.fromarray(img).resize((32, 32)).convert("RGB").save(root / f"images/{i}.png")
        rows[f"r{i}"] = {"id": f"r{i}", "image": f"images/{i}.png", "label": str(label)}
    espeak = shutil.which("espeak-ng")
    if espeak:
        subprocess.run([espeak, "-w", str(root / "audio/0.wav"), "seven"], check=True, timeout=60)
        rows["r0"]["audio"] = "audio/0.wav"
    t = np.linspace(0, 2 * np.pi, 200)
    pts = np.stack([np.cos(t), np.sin(t), 0.1 * np.sin(3 * t)], 1)
    lines = ["ply", "format ascii 1.0", f"element vertex {len(pts)}", "property float x"]
    lines += ["property float y", "property float z", "end_header"]
    lines += [" ".join(f"{v:.4f}" for v in p) for p in pts]
    (root / "points/0.ply").write_text("\n".join(lines) + "\n")
    rows["r0"]["pointcloud"] = "points/0.ply"
    np.save(root / "signals/0.npy", np.stack([np.sin(t[:128] * k) for k in (1, 2, 3)]))
    rows["r0"]["signal"] = "signals/0.npy"
    with open(root / "manifest.jsonl", "w") as f:
        for r in rows.values():
            f.write(json.dumps(r) + "\n")
    return rows


def _report(rows: dict[str, dict], corpus: Path, has_audio: bool) -> dict:
    hits = [
        {"rank": 1, "id": "r1", "label": "7", "score": 0.91},
        {"rank": 2, "id": "r2", "label": "2", "score": 0.40},
    ]
    reqs = {
        "classify image": {
            "status": 200,
            "latency_ms": 12.0,
            "inputs": {"id": "r0", "image": rows["r0"]["image"]},
            "answer": {"label": "7", "true": "7"},
        },
        "search pointcloud7->image": {
            "status": 200,
            "latency_ms": 30.0,
            "inputs": {"id": "r0", "pointcloud": "points/0.ply"},
            "answer": {"results": hits, "true": "7"},
        },
        "search signal7->image": {
            "status": 200,
            "latency_ms": 30.0,
            "inputs": {"id": "r0", "signal": "signals/0.npy"},
            "answer": {"results": hits, "true": "7"},
        },
    }
    if has_audio:
        reqs["search audio7->image"] = {
            "status": 200,
            "latency_ms": 25.0,
            "inputs": {"id": "r0", "audio": "audio/0.wav"},
            "answer": {"results": hits, "true": "7"},
        }
    return {
        "total_seconds": 700.0,
        "steps": {"corpus": {"seconds": 60.0, "skipped": False}, "train": {"seconds": 500.0}},
        "corpus": {"rows_read": 3, "rows_written": 3, "splits": {"test": 3}},
        "training": {"stages": {"align": {"steps": 300, "first_loss": 9.0, "final_loss": 2.0}}},
        "serving": {
            "requests": reqs,
            "corpus_dir": str(corpus),
            "examples": {"search pointcloud7->image": {"top1_right": True}},
        },
        "paths": {"export": "/x/export"},
    }


METRICS = {
    "retrieval_summary": {"R@1": {"text->image": 0.95, "image->text": 0.93, "audio->image": 0.9}},
    "mean_R@1": 0.93,
    "emergent": {"mean_R@1": 0.86},
    "fusion": {"fusion_gain": 0.02},
    "zero_shot": {"per_modality": {"image": {"accuracy": 0.9}, "audio": {"accuracy": 0.8}}},
    "classification": {"per_modality": {"image": {"accuracy": 0.92}}, "fused": {"accuracy": 0.97}},
}
BASELINES = {"per_modality": {"image": {"accuracy": 0.91}, "audio": {"accuracy": 0.84}}}


@pytest.mark.skipif(
    _chromium() is None, reason="chromium is not installed (apt-get install chromium)"
)
def test_report_renders_in_headless_chromium(tmp_path):
    from jobs.demo.html_report import write_html_report
    from jobs.training.plots import loss_small_multiples

    corpus = tmp_path / "corpus"
    rows = _corpus(corpus)
    reports = tmp_path / "reports"
    (reports / "eval").mkdir(parents=True)
    recs = [
        {"stage": "align", "step": s, "loss": 5 / s, "loss/nce_text_image": 2 / s}
        for s in range(1, 40)
    ]
    assert loss_small_multiples(recs, "align", str(reports / "loss_align.png"))
    assert loss_small_multiples(recs, "align", str(reports / "eval" / "retrieval_r1.png"))
    has_audio = "audio" in rows["r0"]
    page = write_html_report(
        _report(rows, corpus, has_audio),
        reports,
        metrics=METRICS,
        baselines=BASELINES,
        corpus_dir=corpus,
        log_dir=tmp_path,
    )
    shot = tmp_path / "index.png"
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--virtual-time-budget=10000",
        "--window-size=1280,2400",
        f"--screenshot={shot}",
        "--dump-dom",
        page.as_uri(),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    for section in ("steps", "targets", "examples", "plots", "files"):
        assert f'<section id="{section}">' in dom, section
    # Every image (plots, thumbnails, renders, search hits) decoded in the browser.
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, "the page's load check did not run"
    n_ok, n_all = int(loaded.group(1)), int(loaded.group(2))
    assert n_all >= 2 + 1 + 2 * 2 and n_ok == n_all, loaded.group(0)
    assert 'src="loss_align.png"' in dom and 'src="eval/retrieval_r1.png"' in dom
    assert 'alt="pointcloud points/0.ply"' in dom and 'alt="signal signals/0.npy"' in dom
    if has_audio:
        assert re.search(r'<audio controls="" src="data:audio/wav;base64,', dom)
    assert "OmniRay" in dom and "missed" in dom  # audio 0.80 < baseline 0.84
    assert shot.is_file() and shot.stat().st_size > 20_000
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    kept = ARTIFACTS / "html_report_screenshot.png"
    shutil.copy2(shot, kept)
    shutil.copy2(page, ARTIFACTS / "html_report_index.html")
    print(f"screenshot of the report: {kept}")
