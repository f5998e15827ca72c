"""The generation part of the demo's serving step: ``POST /v1/generate`` through the running
service, files written to ``reports/``.

"seven" -> image, a spoken "seven" -> image, an image of a 7 -> spoken audio (WAV), "seven"
-> signal trace (NPY) and -> point cloud (PLY). The inputs are the raw test-split corpus
files a client would upload; the outputs are the files the service returns, saved as is.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

_SUFFIX = {
    "image/png": ".png",
    "audio/wav": ".wav",
    "application/x-ply": ".ply",
    "application/x-npy": ".npy",
    "text/csv": ".csv",
}


def exercise_generation(
    call: Callable[..., Any],
    rows: list[dict[str, Any]],
    corpus_dir: Path,
    results: dict[str, Any],
    reports_dir: Path,
    *,
    digit: str = "7",
    word: str = "seven",
) -> None:
    """Sends the demo's generation requests with ``call(name, method, path, body, summarize)``
    (the serve exercise's request helper) and saves the returned files.

    Records ``results["generation"] = {name: {"files": [...], "input": ...}}``.
    """
    listed = results.get("_models") or {}
    directions = {(d["input"], d["target"]) for d in listed.get("generation", [])}
    if listed and not directions:
        results["generation"] = {"skipped": "the export has no generation heads"}
        return

    def _b64(rel: str) -> str:
        return base64.b64encode((corpus_dir / rel).read_bytes()).decode()

    def _row(modality: str) -> dict[str, Any] | None:
        return next(
            (r for r in rows if modality in r["kept"] and str(r.get("label")) == digit), None
        )

    audio_row, image_row = _row("audio"), _row("image")
    plan: list[tuple[str, dict[str, Any], str, int]] = [
        (f"text '{word}' -> image", {"text": word}, "image", 4),
    ]
    if audio_row is not None:
        plan.append((f"spoken {digit} -> image", {"audio": _b64(audio_row["audio"])}, "image", 4))
    if image_row is not None:
        plan.append((f"image of {digit} -> audio", {"image": _b64(image_row["image"])}, "audio", 1))
    plan += [
        (f"text '{word}' -> signal", {"text": word}, "signal", 1),
        (f"text '{word}' -> pointcloud", {"text": word}, "pointcloud", 1),
    ]
    out_dir = Path(reports_dir) / "generated"
    out_dir.mkdir(parents=True, exist_ok=True)
    gen: dict[str, Any] = {}
    for name, inp, target, n in plan:
        data = call(
            f"generate {name}",
            "POST",
            "/v1/generate",
            {"input": inp, "target": target, "n": n, "seed": 0},
            summarize=lambda d: f"{len(d['data'])} x {d['data'][0]['mime']}",
        )
        if not data:
            continue
        src = next(iter(inp))
        files = []
        for d in data["data"]:
            path = (
                out_dir / f"{src}_{digit}_to_{target}_seed{d['seed']}{_SUFFIX.get(d['mime'], '')}"
            )
            path.write_bytes(base64.b64decode(d["b64"]))
            files.append(str(path))
        gen[name] = {"target": target, "files": files, "latency_ms": data["usage"]["latency_ms"]}
    results["generation"] = gen
