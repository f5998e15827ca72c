"""The main job's orchestration end to end at `tiny` size (corpus → prepare → train → evaluate
→ serve run → one request per endpoint → report), then a second run that skips every step."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from common.modalities import modality_names

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_demo(work: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.demo",
            "--profile",
            "tiny",
            "--work",
            str(work),
            "--port",
            str(_free_port()),
            *extra,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
    )


@pytest.mark.slow
def test_demo_tiny_end_to_end_and_cached_rerun(tmp_path):
    r = _run_demo(tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    report = json.loads((tmp_path / "reports" / "demo_report.json").read_text())
    steps = report["steps"]
    assert [s for s in ("corpus", "prepare", "train", "evaluate", "serve") if s in steps] == [
        "corpus",
        "prepare",
        "train",
        "evaluate",
        "serve",
    ]
    assert not any(v["skipped"] for v in steps.values())
    assert report["corpus"]["rows_read"] > 0
    # Every endpoint and modality answered 200 through real HTTP.
    reqs = report["serving"]["requests"]
    for name in (
        "healthz",
        "models",
        "fuse",
        "search audio7->image",
        "classify image",
        "describe image",
        *(f"embed/{m}" for m in modality_names()),
    ):
        assert reqs[name]["status"] == 200, (name, reqs[name])
    # The tiny test split holds only a few images: up to 5 results, all labelled.
    top = report["serving"]["seven_search"]["top5_labels"]
    assert 1 <= len(top) <= 5 and all(lab is not None for lab in top)
    assert (tmp_path / "runs" / "tiny" / "export" / "model.safetensors").is_file()
    assert any(p.endswith(".png") for p in report["paths"]["plots"])
    assert "OmniRay demo report" in r.stdout

    # A second run skips the finished steps (no serving, to keep it short).
    r2 = _run_demo(tmp_path, "--no-serve")
    assert r2.returncode == 0, r2.stdout[-4000:] + r2.stderr[-4000:]
    report2 = json.loads((tmp_path / "reports" / "demo_report.json").read_text())
    assert all(v["skipped"] for v in report2["steps"].values()), report2["steps"]


def test_demo_rejects_unknown_profile():
    r = subprocess.run(
        [sys.executable, "-m", "jobs.demo", "--profile", "huge"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "invalid choice" in r.stderr
