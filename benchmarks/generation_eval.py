"""Generation figures: recognized fraction per direction, HTTP latency, training and export cost.

    .venv/bin/python benchmarks/generation_eval.py --export RUN/export \
        --shards data/omnidigits_prepared [--prompts 100] [--seeds 2] [--requests 40] \
        [--no-http] [--out benchmarks/results/generation_eval.json]

1. Quality (``jobs.evaluation.generation``): on the split's (``--split``, default test) prompts,
   the fraction of generated samples that an independent classifier (HOG + logistic
   regression for images, a small 1-D CNN over log-mel frames for audio, ...; fitted on real
   train items only; its own held-out accuracy is printed beside) assigns to the prompt's digit,
   for text->image, audio->image, image->audio, text->signal, text->pointcloud (goal >= 0.8;
   chance 0.1); diversity and novelty; sample grids into ``--reports``.
2. Latency through HTTP: the app deployed in-process (``serve.run(build_app(args))``, the
   demo serve YAML's args), ``POST /v1/generate`` text->image/audio/signal/pointcloud with
   ``n=1`` and ``n=8`` (one request each, sequential): p50/p99 ms per request.
3. Cost: the generation heads' share of the export's ``model.safetensors`` (bytes of their
   tensors), and the time of one align-stage forward+backward with vs without the ``generate``
   part on a batch of real train rows (same model, ``--steps`` repeats, medians).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def quality(export: Path, shards: Path, split: str, prompts: int, seeds: int, reports: Path):
    from jobs.evaluation.data import load_split
    from jobs.evaluation.generation import GenerationEvalConfig, evaluate_generation
    from jobs.exports import load_export

    ex = load_export(export)
    cfg = GenerationEvalConfig(max_prompts=prompts, seeds=seeds)
    data = load_split(str(shards), split)
    train = load_split(str(shards), "train", cfg.max_train_rows)
    return evaluate_generation(ex.model, data, train, cfg, reports)


def cost(export: Path, shards: Path, steps: int, batch_size: int) -> dict:
    import torch
    from safetensors import safe_open

    from jobs.evaluation.data import load_split
    from jobs.exports import load_export
    from jobs.training.config import StageSection
    from jobs.training.stage import StageObjective
    from models.data import collate

    total = gen = 0
    with safe_open(str(export / "model.safetensors"), "pt") as f:
        for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            t = f.get_slice(k)
            n = 1
            for s in t.get_shape():
                n *= s
            b = n * 4
            total += b
            gen += b if k.startswith("generators.") else 0
    ex = load_export(export)
    model = ex.model.train()
    data = load_split(str(shards), "train", batch_size)
    rows = [
        {"label": data.labels[i], **{m: c[i] for m, c in data.tensors.items() if c[i] is not None}}
        for i in range(len(data))
    ]
    mods = [m for m in model.modalities if any(m in r for r in rows)]
    batch = collate(rows, modalities=mods, label_names=sorted({str(r["label"]) for r in rows}))
    times = {}
    for name, weights in (("with_generation", {}), ("without_generation", {"generate": 0.0})):
        st = StageSection(loss_weights=weights)
        obj = StageObjective(
            "align", st, modalities=mods, label_names=[], pairs=[["text", "image"]]
        )
        ts = []
        for step in range(steps + 1):
            b = dict(batch)
            t0 = time.perf_counter()
            terms, _ = obj(model, b, step=step)
            terms["loss"].backward()
            model.zero_grad(set_to_none=True)
            if step:  # the first is a warm-up
                ts.append(time.perf_counter() - t0)
        times[name] = statistics.median(ts)
    torch.set_grad_enabled(True)
    return {
        "export_bytes_fp32": total,
        "generation_head_bytes_fp32": gen,
        "generation_share_of_export": round(gen / total, 4) if total else None,
        "align_step_s": {k: round(v, 4) for k, v in times.items()},
        "align_step_added_fraction": round(
            times["with_generation"] / times["without_generation"] - 1, 4
        ),
        "batch_rows": len(rows),
    }


def _demo_requests(client, shards: Path, corpus: Path, reports: Path) -> dict:
    """The demo's generation requests (``jobs.demo.generation_exercise``) against the app."""
    from jobs.demo.generation_exercise import exercise_generation
    from jobs.demo.serve_exercise import _test_rows

    results: dict = {"requests": {}, "_models": client.get("/v1/models").json()["data"][0]}

    def call(name, method, path, body=None, summarize=None):
        t0 = time.perf_counter()
        r = client.request(method, path, json=body)
        ms = round((time.perf_counter() - t0) * 1000, 1)
        ok = r.status_code == 200
        results["requests"][name] = {"status": r.status_code, "latency_ms": ms}
        print(f"    {name:<32} {r.status_code} {ms:8.1f} ms", flush=True)
        return r.json() if ok else None

    exercise_generation(call, _test_rows(shards, corpus), corpus, results, reports)
    results.pop("_models")
    return results


def http_latency(
    export: Path,
    requests: int,
    shards: Path | None = None,
    corpus: Path | None = None,
    reports: Path | None = None,
) -> dict:
    import httpx
    import numpy as np
    import yaml
    from ray import serve

    from serve.app import build_app

    cfg = yaml.safe_load((ROOT / "configs/serve/demo.yaml").read_text())
    args = cfg["applications"][0]["args"]
    args.update(export_dir=str(export), api_key=None)
    args["gallery"] = {"split_dir": None}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    out: dict = {}
    try:
        serve.run(build_app(args), name="gen_bench", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            for target in ("image", "audio", "signal", "pointcloud") if requests else ():
                for n in (1, 8):
                    body = {"input": {"text": "seven"}, "target": target, "n": n}
                    c.post("/v1/generate", json={**body, "seed": 0}).raise_for_status()
                    ms = []
                    for i in range(requests):
                        t0 = time.perf_counter()
                        r = c.post("/v1/generate", json={**body, "seed": i})
                        r.raise_for_status()
                        ms.append((time.perf_counter() - t0) * 1000)
                    out[f"text->{target} n={n}"] = {
                        "p50_ms": round(float(np.percentile(ms, 50)), 1),
                        "p99_ms": round(float(np.percentile(ms, 99)), 1),
                        "per_item_p50_ms": round(float(np.percentile(ms, 50)) / n, 1),
                        "requests": requests,
                    }
                    print(f"  text->{target:<10} n={n}: {out[f'text->{target} n={n}']}", flush=True)
            if corpus is not None and shards is not None and reports is not None:
                out["demo_requests"] = _demo_requests(c, shards, corpus, reports)
    finally:
        serve.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--export", type=Path, required=True)
    ap.add_argument("--shards", type=Path, required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--steps", type=int, default=5, help="align steps timed per variant")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--no-http", action="store_true")
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--corpus", type=Path, default=None, help="raw corpus: demo requests too")
    ap.add_argument("--reports", type=Path, default=ROOT / "reports")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/generation_eval.json")
    a = ap.parse_args()
    res: dict = {"export": str(a.export), "shards": str(a.shards), "split": a.split}
    t0 = time.perf_counter()
    res["quality"] = quality(a.export, a.shards, a.split, a.prompts, a.seeds, a.reports)
    print(json.dumps(res["quality"]["classifiers"], indent=1))
    for k, v in res["quality"]["directions"].items():
        print(
            f"  {k:<18} {json.dumps({x: v.get(x) for x in ('recognized', 'classifier_accuracy', 'diversity', 'novelty', 'copies')})}"
        )
    res["cost"] = cost(a.export, a.shards, a.steps, a.batch)
    print(json.dumps(res["cost"], indent=1))
    if not a.no_http:
        import ray

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
        res["http_latency"] = http_latency(a.export, a.requests, a.shards, a.corpus, a.reports)
        ray.shutdown()
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
