"""The serving step of the demo: ``serve run`` the app, send real requests, shut it down.

The service is started exactly as a user would start it (``serve run <yaml>``), from a copy of
the profile's serve YAML whose export dir, gallery split and port point at this run. Sample
inputs are the raw corpus files of test-split rows (the same bytes a client would upload),
so every request goes through the service's own decoding and featurization.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import yaml

from common.modalities import get_modality, modality_names

ROOT = Path(__file__).resolve().parents[2]
#: (query modality, digit) of the demo's example searches against the image gallery.
SEARCH_EXAMPLES = (
    ("audio", "7"),
    ("text", "3"),
    ("video", "5"),
    ("pointcloud", "2"),
    ("signal", "8"),
)
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _write_serve_yaml(src: Path, dst: Path, export_dir: Path, gallery: Path, port: int) -> Path:
    cfg = yaml.safe_load(src.read_text())
    cfg.setdefault("http_options", {})
    cfg["http_options"]["host"] = "127.0.0.1"
    cfg["http_options"]["port"] = int(port)
    (app,) = cfg["applications"]
    app["args"]["export_dir"] = str(export_dir)
    app["args"].setdefault("gallery", {})["split_dir"] = str(gallery)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dst


def _test_rows(shards_dir: Path, corpus_dir: Path) -> list[dict[str, Any]]:
    """Manifest rows (raw file paths) of the test split's kept rows, with kept modalities."""
    table = pq.read_table(shards_dir / "test", columns=["id", "label", "modalities"])
    kept = {r["id"]: r for r in table.to_pylist()}
    rows = []
    with open(corpus_dir / "manifest.jsonl") as f:
        for line in f:
            row = json.loads(line)
            if row["id"] in kept:
                row["kept"] = set(kept[row["id"]]["modalities"] or [])
                rows.append(row)
    rows.sort(key=lambda r: r["id"])
    return rows


def _b64(corpus_dir: Path, rel: str) -> str:
    return base64.b64encode((corpus_dir / rel).read_bytes()).decode()


def _signal_list(corpus_dir: Path, rel: str) -> list[list[float]]:
    path = corpus_dir / rel
    if path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
    else:
        arr = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float32).T
    return np.asarray(arr, dtype=np.float32).tolist()


def _input_for(row: dict[str, Any], modality: str, corpus_dir: Path) -> dict[str, Any]:
    if get_modality(modality).inline:  # a caption, a tabular record: the value itself
        return {modality: row[modality]}
    if modality == "signal":  # shows the JSON-array form of a file modality
        return {"signal": _signal_list(corpus_dir, row["signal"])}
    return {modality: _b64(corpus_dir, row[modality])}


def _pick(rows: list[dict], modalities: tuple[str, ...], label: str | None = None) -> dict | None:
    for r in rows:
        if all(m in r["kept"] for m in modalities) and (label is None or r.get("label") == label):
            return r
    return None


#: Ray Serve controller messages that mean a deployment cannot come up (a replica's
#: constructor raised): waiting longer would only hit the timeout.
_FATAL_MARKERS = ("Failed to update the deployments", "DEPLOY_FAILED")


def _wait_healthy(
    client, base: str, proc: subprocess.Popen, timeout_s: float, log_path: Path
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`serve run` exited early with code {proc.returncode}")
        log_text = log_path.read_text(errors="replace")
        if any(marker in log_text for marker in _FATAL_MARKERS):
            errors = [ln for ln in log_text.splitlines() if "Error" in ln]
            raise RuntimeError(
                "a deployment failed to start: " + (errors[-1].strip() if errors else "see log")
            )
        try:
            r = client.get(f"{base}/healthz", timeout=5)
            if r.status_code == 200 and r.json().get("status") in ("ok", "healthy", True):
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(2)
    raise TimeoutError(f"service not healthy after {timeout_s:.0f}s")


def exercise_service(
    *,
    serve_yaml: Path,
    export_dir: Path,
    shards_dir: Path,
    corpus_dir: Path,
    work_dir: Path,
    port: int,
    env: dict[str, str] | None = None,
    startup_timeout_s: float = 600.0,
    reports_dir: Path | None = None,
) -> dict[str, Any]:
    """Starts the app with ``serve run``, sends one request per endpoint/modality, stops it.

    Returns:
        ``{"ok": bool, "requests": {name: {status, latency_ms, summary}}, "seven_search": ...}``.
    """
    import httpx

    yaml_path = _write_serve_yaml(
        serve_yaml, work_dir / "serve.yaml", export_dir, shards_dir / "test", port
    )
    log_path = work_dir / "serve.log"
    serve_bin = Path(sys.executable).with_name("serve")
    cmd = [str(serve_bin), "run", str(yaml_path)]
    # With RAY_ADDRESS (the demo's own head) `serve run` deploys there and, on Ctrl-C, removes
    # the app and leaves the cluster to its owner.
    env = dict(env if env is not None else os.environ, PYTHONUNBUFFERED="1")
    rows = _test_rows(shards_dir, corpus_dir)
    results: dict[str, Any] = {
        "ok": True,
        "requests": {},
        "log": str(log_path),
        "corpus_dir": str(corpus_dir),
    }
    base = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            with httpx.Client(timeout=120) as client:
                _wait_healthy(client, base, proc, startup_timeout_s, log_path)
                results["startup_seconds"] = round(time.perf_counter() - t0, 1)
                print(f"    service up at {base} after {results['startup_seconds']}s", flush=True)
                _send_all(client, base, rows, corpus_dir, results, reports_dir or work_dir)
        except Exception as e:  # noqa: BLE001 - reported, then the service is stopped
            results["ok"] = False
            results["error"] = f"{type(e).__name__}: {e}"
            print(f"    serving failed: {results['error']}; see {log_path}", flush=True)
        finally:
            _stop(proc)
    return results


def stop_process_group(proc: subprocess.Popen, escalation: tuple[tuple[int, float], ...]) -> None:
    """Signals ``proc``'s process group with each ``(signal, wait_s)`` in turn until it exits."""
    if proc.poll() is not None:
        return
    for sig, wait in escalation:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl-C the ``serve run`` process (it deletes the app and shuts Serve down)."""
    stop_process_group(proc, ((signal.SIGINT, 90), (signal.SIGTERM, 20), (signal.SIGKILL, 10)))


def _send_all(
    client, base: str, rows: list[dict], corpus_dir: Path, results: dict, reports_dir: Path
) -> None:
    reqs = results["requests"]

    def call(
        name: str,
        method: str,
        path: str,
        body: Any = None,
        summarize=None,
        inputs: dict[str, str] | None = None,
        keep=None,
        quiet: bool = False,
    ) -> Any:
        """One request; ``inputs`` = ``{modality: corpus path or inline value}`` of the query
        and ``keep(data)`` = the part of the answer the HTML report shows."""
        t = time.perf_counter()
        r = client.request(method, f"{base}{path}", json=body)
        ms = (time.perf_counter() - t) * 1000
        ok = r.status_code == 200
        data = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        summary = ""
        if ok and summarize is not None:
            summary = summarize(data)
        elif not ok:
            summary = json.dumps(data)[:200]
            results["ok"] = False
        reqs[name] = {"status": r.status_code, "latency_ms": round(ms, 1), "summary": summary}
        if inputs:
            reqs[name]["inputs"] = inputs
        if ok and keep is not None:
            reqs[name]["answer"] = keep(data)
        if not quiet or not ok:
            print(f"    {name:<26} {r.status_code} {ms:7.1f} ms  {summary}", flush=True)
        return data if ok else None

    call("healthz", "GET", "/healthz", summarize=lambda d: d.get("status", ""))
    listed = call(
        "models", "GET", "/v1/models", summarize=lambda d: ",".join(m["id"] for m in d["data"])
    )
    model_id = listed["data"][0]["id"] if listed and listed.get("data") else "omniray"
    results["_models"] = listed["data"][0] if listed and listed.get("data") else {}
    for m in modality_names():
        row = _pick(rows, (m,))
        if row is None:
            reqs[f"embed/{m}"] = {"status": None, "latency_ms": 0.0, "summary": "no test row"}
            continue
        call(
            f"embed/{m}",
            "POST",
            "/v1/embeddings",
            {"input": [_input_for(row, m, corpus_dir)], "model": model_id},
            summarize=lambda d: f"dim={len(d['data'][0]['embedding'])}",
            inputs=_shown(row, (m,)),
            quiet=True,
        )
    embeds = {k[6:]: v for k, v in reqs.items() if k.startswith("embed/") and v["status"]}
    if embeds:
        cells = ", ".join(f"{m} {v['status']} {v['latency_ms']:.0f} ms" for m, v in embeds.items())
        print(f"    {'embeddings':<26} {cells}", flush=True)
    # Fusion of as many of these as one test row has (tiny corpora may lack the full set).
    preferred = ("image", "audio", "signal", "tabular")
    row = max(rows, key=lambda r: sum(m in r["kept"] for m in preferred), default=None)
    fuse_mods = tuple(m for m in preferred if row is not None and m in row["kept"])
    if len(fuse_mods) >= 2:
        body = {
            "input": {k: v for m in fuse_mods for k, v in _input_for(row, m, corpus_dir).items()}
        }
        call(
            "fuse",
            "POST",
            "/v1/fuse",
            body,
            summarize=lambda d: (
                "gates " + json.dumps({k: round(float(v), 2) for k, v in _gate_items(d["gates"])})
            ),
            inputs=_shown(row, fuse_mods),
            keep=lambda d: {"gates": {k: float(v) for k, v in _gate_items(d["gates"])}},
        )
    # The headline check: a spoken "seven" retrieves images of sevens; then one query of
    # each other input kind (a different digit each) against the image gallery.
    results["examples"] = {}
    for m, label in SEARCH_EXAMPLES:
        row = _pick(rows, (m,), label=label)
        if row is None:
            continue
        name = f"search {m}{label}->image"
        data = call(
            name,
            "POST",
            "/v1/search",
            {"query": _input_for(row, m, corpus_dir), "target": "image", "k": 5},
            summarize=lambda d: "labels " + ",".join(str(x.get("label")) for x in d["results"]),
            inputs=_shown(row, (m,)),
            keep=lambda d, row=row: {"results": d["results"], "true": row.get("label")},
        )
        if data:
            labels = [x.get("label") for x in data["results"]]
            results["examples"][name] = {
                "query_id": row["id"],
                "true": label,
                "top5_labels": labels,
                "top1_right": bool(labels) and labels[0] == label,
            }
            if m == "audio" and label == "7":
                results["seven_search"] = {
                    "query_id": row["id"],
                    "top5_labels": labels,
                    "sevens_in_top5": sum(lab == "7" for lab in labels),
                }
    row = _pick(rows, ("image",))
    if row is not None:
        labels = [str(i) for i in range(10)]
        data = call(
            "classify image",
            "POST",
            "/v1/classify",
            {"input": _input_for(row, "image", corpus_dir), "labels": labels},
            summarize=lambda d: f"pred {d['label']} (true {row.get('label')})",
            inputs=_shown(row, ("image",)),
            keep=lambda d: {"label": d["label"], "true": row.get("label")},
        )
        if data:
            results["classify"] = {"true": row.get("label"), "pred": data["label"]}
        call(
            "describe image",
            "POST",
            "/v1/describe",
            {"input": _input_for(row, "image", corpus_dir)},
            summarize=lambda d: f"{d['text']!r} (true {row.get('label')})",
            inputs=_shown(row, ("image",)),
            keep=lambda d: {"text": d["text"], "true": row.get("label")},
        )
    from jobs.demo.generation_exercise import exercise_generation

    exercise_generation(call, rows, corpus_dir, results, reports_dir)
    results.pop("_models", None)


def _shown(row: dict[str, Any], modalities: tuple[str, ...]) -> dict[str, Any]:
    """What the report shows of a query: each modality's corpus path (or inline value)."""
    return {"id": row["id"], **{m: row[m] for m in modalities if m in row}}


def _gate_items(gates: Any):
    if isinstance(gates, dict):
        return gates.items()
    return [(str(i), g) for i, g in enumerate(gates)]
