"""What generation costs: ``POST /v1/generate`` latency over real HTTP, export size and
align-step time with and without the generation heads. JSON out.

Three measurements, each side by side in one run (the machine is shared; the load average
at start and end is recorded with every phase):

1. **export size**: two untrained exports of ``--size`` written with the same seed, one
   with generation heads (``--hidden``, the demo's width; every target with a generation
   space) and one without (``generation: {}``): bytes of ``model.safetensors`` and of the
   whole directory, parameters of ``generators.*``;
2. **align step**: the same batch (``--batch`` synthetic rows of every branch), the same
   model, one optimizer step of the ``align`` stage with the generation terms (default
   weight 1) and without (``loss_weights.generate: 0``, so the heads are frozen and not
   run, as the job does), alternated step by step after a warm-up (1 process, no Ray);
3. **HTTP latency**: the export with heads served on 127.0.0.1 (a private local Ray, a
   free port, the proxy header guard the tests use); for each direction listed by
   ``GET /v1/models`` (every served input modality, and ``fused``, to every target but
   itself) and each ``n`` in ``--ns``: ``--warmup`` requests, then ``--requests``
   sequential requests timed at the client; p50/p99 per request and per item.

Untrained weights: speed does not depend on them. Inputs are text (a word) and, for every
other served modality, the file its own writer makes of a random featurized item.

    .venv/bin/python benchmarks/generation_latency.py            # ~8-10 min on 2 busy cores
    .venv/bin/python benchmarks/generation_latency.py --requests 2 --warmup 1 --train-steps 1 --out /tmp/x.json  # smoke

Writes ``benchmarks/results/generation_latency.json`` (override with ``--out``).
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

APP = "omniray_gen_bench"
WORD = "seven"


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _pct(ms: list[float]) -> dict[str, float | None]:
    if not ms:
        return {"p50_ms": None, "p99_ms": None, "mean_ms": None}
    a = np.asarray(ms)
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 2),
        "p99_ms": round(float(np.percentile(a, 99)), 2),
        "mean_ms": round(float(a.mean()), 2),
    }


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- 1. exports
def make_exports(work: Path, size: str, hidden: int, seed: int) -> tuple[Path, Path]:
    """``(with_heads, without)``: untrained exports of ``size``, same seed and tokenizer."""
    from models.generation import SPACES
    from serve.devtools import DEFAULT_TEXTS, make_untrained_export

    texts = [*DEFAULT_TEXTS, WORD]
    gen_dir, bare_dir = work / f"export_{size}_gen", work / f"export_{size}_bare"
    for d in (gen_dir, bare_dir):
        if d.exists():
            shutil.rmtree(d)
    from common.modalities import modality_names

    targets = [m for m in modality_names() if m in SPACES]
    make_untrained_export(
        gen_dir,
        size=size,
        texts=texts,
        seed=seed,
        generation={"targets": targets, "hidden": hidden},
    )
    make_untrained_export(bare_dir, size=size, texts=texts, seed=seed, generation={})
    return gen_dir, bare_dir


def export_sizes(gen_dir: Path, bare_dir: Path) -> dict[str, Any]:
    from safetensors import safe_open

    gen_params: dict[str, int] = {}
    with safe_open(str(gen_dir / "model.safetensors"), "pt") as f:
        for k in f.keys():
            if k.startswith("generators."):
                target = k.split(".")[1]
                n = int(np.prod(f.get_slice(k).get_shape()))
                gen_params[target] = gen_params.get(target, 0) + n
    w_gen = (gen_dir / "model.safetensors").stat().st_size
    w_bare = (bare_dir / "model.safetensors").stat().st_size
    d_gen, d_bare = _dir_bytes(gen_dir), _dir_bytes(bare_dir)
    return {
        "weights_bytes_with": w_gen,
        "weights_bytes_without": w_bare,
        "weights_added_bytes": w_gen - w_bare,
        "weights_ratio": round(w_gen / w_bare, 3),
        "export_dir_bytes_with": d_gen,
        "export_dir_bytes_without": d_bare,
        "export_dir_ratio": round(d_gen / d_bare, 3),
        "generator_params": {**gen_params, "total": sum(gen_params.values())},
    }


# ----------------------------------------------------------------------------- 2. align step
def align_step_times(gen_dir: Path, batch_size: int, steps: int, warmup: int) -> dict[str, Any]:
    """ms per align optimizer step, with vs without generation terms, same batch, alternated."""
    import itertools

    import torch

    from jobs.exports import load_export
    from jobs.training.config import StageSection
    from jobs.training.stage import StageObjective
    from models.data import synthetic_samples

    torch.manual_seed(0)
    base = load_export(gen_dir).model
    cfg = base.config
    mods = list(base.modalities)
    labels = [str(i) for i in range(10)]
    samples = synthetic_samples(cfg, batch_size, seed=3, modalities=mods)
    pairs = [list(p) for p in itertools.combinations(mods, 2)]
    runs: dict[str, dict[str, Any]] = {}
    for name, weights in (("with_generation", {}), ("without_generation", {"generate": 0.0})):
        obj = StageObjective(
            "align",
            StageSection(loss_weights=weights),
            modalities=mods,
            label_names=labels,
            pairs=pairs,
        )
        model = copy.deepcopy(base).train()
        frozen = obj.freeze_unused(model)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        runs[name] = {
            "obj": obj,
            "model": model,
            "opt": opt,
            "ms": [],
            "trainable_params": sum(p.numel() for p in params),
            "frozen": frozen,
        }
    batch = next(iter(runs.values()))["obj"].collate(samples, labels)

    def step(r: dict[str, Any], i: int) -> tuple[float, list[str]]:
        b = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in batch.items()}
        t0 = time.perf_counter()
        terms, _ = r["obj"](r["model"], b, step=i)
        r["opt"].zero_grad(set_to_none=True)
        terms["loss"].backward()
        r["opt"].step()
        return (time.perf_counter() - t0) * 1000, sorted(terms)

    names: dict[str, list[str]] = {}
    for i in range(warmup + steps):
        # Alternate the order each step so that drift of a shared machine cancels.
        order = list(runs) if i % 2 == 0 else list(reversed(runs))
        for name in order:
            ms, names[name] = step(runs[name], i)
            if i >= warmup:
                runs[name]["ms"].append(ms)
    out: dict[str, Any] = {
        "batch_rows": batch_size,
        "modalities": mods,
        "steps_timed": steps,
        "warmup": warmup,
        "torch_threads": torch.get_num_threads(),
    }
    for name, r in runs.items():
        out[name] = {
            "median_ms_per_step": round(float(np.median(r["ms"])), 1),
            "mean_ms_per_step": round(float(np.mean(r["ms"])), 1),
            "trainable_params": r["trainable_params"],
            "frozen_modules": r["frozen"],
            "gen_terms": [t for t in names[name] if t.startswith("gen_")],
        }
    w, wo = (
        out["with_generation"]["median_ms_per_step"],
        out["without_generation"]["median_ms_per_step"],
    )
    out["added_ms_per_step"] = round(w - wo, 1)
    out["ratio_with_vs_without"] = round(w / wo, 3)
    return out


# ----------------------------------------------------------------------------- 3. HTTP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_inputs(gen_dir: Path, mods: list[str]) -> dict[str, Any]:
    """One request value per input modality: a word for text, else the file the
    modality's writer makes of a random featurized item (base64)."""
    from jobs.exports import load_featurizers
    from models import OmniConfig
    from models.data import synthetic_samples

    cfg = OmniConfig.from_yaml(gen_dir / "model_config.yaml")
    _, feats = load_featurizers(gen_dir, cfg, mods)
    sample = synthetic_samples(cfg, 1, seed=5, modalities=mods)[0]
    out: dict[str, Any] = {}
    for m in mods:
        if m == "text":
            out[m] = WORD
        else:
            out[m] = base64.b64encode(feats[m].write(sample[m]).data).decode("ascii")
    return out


def http_latency(
    gen_dir: Path, mods: list[str], ns: list[int], requests: int, warmup: int, num_cpus: int
) -> dict[str, Any]:
    import httpx
    import ray
    from ray import serve

    from serve.app import build_app
    from serve.proxy_guard import PROXY_CALLBACK_ENV, PROXY_CALLBACK_PATH

    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK_PATH)
    values = request_inputs(gen_dir, mods)
    temp = tempfile.mkdtemp(prefix="ray_gl_", dir="/tmp")
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        _temp_dir=temp,
        configure_logging=False,
        log_to_driver=False,
    )
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {
        "served_modalities": mods,
        "ns": ns,
        "requests": requests,
        "warmup": warmup,
        "directions": {},
    }
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        t0 = time.perf_counter()
        serve.run(
            build_app(
                {
                    "export_dir": str(gen_dir),
                    "modalities": mods,
                    "model_name": "gen-bench",
                    "limits": {"max_inflight": 256, "request_timeout_s": 120},
                }
            ),
            name=APP,
            route_prefix="/",
        )
        out["deploy_s"] = round(time.perf_counter() - t0, 1)
        print(f"  deployed in {out['deploy_s']}s", flush=True)
        with httpx.Client(base_url=url, timeout=120) as c:
            listed = c.get("/v1/models").json()
            dirs = [
                (d["input"], d["target"])
                for m in listed.get("data", [listed])
                for d in (m.get("generation") or [])
            ] or [(d["input"], d["target"]) for d in listed.get("generation", [])]
            for src, tgt in dict.fromkeys(dirs):
                if src == "fused":
                    inp = {m: v for m, v in values.items() if m != tgt}
                    inp = dict(list(inp.items())[:2])
                elif src in values:
                    inp = {src: values[src]}
                else:
                    continue
                key = f"{src}->{tgt}"
                res: dict[str, Any] = {"inputs": sorted(inp)}
                for n in ns:
                    body = {"input": inp, "target": tgt, "n": n, "seed": 0}
                    lat, server, mime = [], [], None
                    for i in range(warmup + requests):
                        t1 = time.perf_counter()
                        r = c.post("/v1/generate", json=body)
                        dt = (time.perf_counter() - t1) * 1000
                        if r.status_code != 200:
                            raise RuntimeError(f"{key} n={n}: HTTP {r.status_code} {r.text[:300]}")
                        d = r.json()
                        if len(d["data"]) != n:
                            raise RuntimeError(f"{key} n={n}: {len(d['data'])} items back")
                        mime = d["data"][0]["mime"]
                        if i >= warmup:
                            lat.append(dt)
                            server.append(d["usage"]["latency_ms"])
                    p = _pct(lat)
                    res[f"n{n}"] = {
                        **p,
                        "p50_ms_per_item": round(p["p50_ms"] / n, 2),
                        "server_p50_ms": _pct(server)["p50_ms"],
                        "mime": mime,
                    }
                    print(
                        f"  {key:22s} n={n}: p50 {p['p50_ms']:8.1f} ms  p99 {p['p99_ms']:8.1f} ms"
                        f"  ({p['p50_ms'] / n:.1f} ms/item)",
                        flush=True,
                    )
                out["directions"][key] = res
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--hidden", type=int, default=256, help="vector heads' width (demo: 256)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(REPO / "runs" / "generation_bench"))
    ap.add_argument(
        "--serve-modalities",
        default=None,
        help="comma list of served modalities (default: every branch with a writer or inline)",
    )
    ap.add_argument("--ns", default="1,8")
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16, help="rows of the align-step batch")
    ap.add_argument("--train-steps", type=int, default=4)
    ap.add_argument("--train-warmup", type=int, default=1)
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--phases", default="size,train,http")
    ap.add_argument(
        "--out", default=str(REPO / "benchmarks" / "results" / "generation_latency.json")
    )
    a = ap.parse_args(argv)
    phases = set(a.phases.split(","))
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "generation_latency",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python benchmarks/generation_latency.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_start": _loadavg(),
            "note": "shared machine: other jobs' load shows in the load averages",
        },
        "model": {"size": a.size, "trained": False, "generation_hidden": a.hidden},
    }

    def save() -> None:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(results, indent=2))

    print(f"writing exports of size {a.size} (with / without generation heads)", flush=True)
    gen_dir, bare_dir = make_exports(work, a.size, a.hidden, a.seed)
    import yaml

    mcfg = yaml.safe_load((gen_dir / "model_config.yaml").read_text())
    results["model"]["generation"] = mcfg.get("generation")
    results["model"]["modalities"] = mcfg.get("modalities")
    if "size" in phases:
        results["export_size"] = export_sizes(gen_dir, bare_dir)
        print(f"  export size: {json.dumps(results['export_size'])}", flush=True)
        save()
    if "train" in phases:
        print("align step with vs without generation terms", flush=True)
        la = _loadavg()
        results["align_step"] = align_step_times(gen_dir, a.batch, a.train_steps, a.train_warmup)
        results["align_step"]["loadavg_start"], results["align_step"]["loadavg_end"] = (
            la,
            _loadavg(),
        )
        s = results["align_step"]
        print(
            f"  with {s['with_generation']['median_ms_per_step']} ms/step, without "
            f"{s['without_generation']['median_ms_per_step']} ms/step "
            f"(x{s['ratio_with_vs_without']})",
            flush=True,
        )
        save()
    if "http" in phases:
        # Inputs: text (a word) and every generation target (its writer makes the file).
        targets = list((results["model"]["generation"] or {}).get("targets", []))
        mods = a.serve_modalities.split(",") if a.serve_modalities else ["text", *targets]
        print(f"HTTP /v1/generate, served: {mods}", flush=True)
        la = _loadavg()
        results["http"] = http_latency(
            gen_dir, mods, [int(x) for x in a.ns.split(",")], a.requests, a.warmup, a.num_cpus
        )
        results["http"]["loadavg_start"], results["http"]["loadavg_end"] = la, _loadavg()
        save()
    results["machine"]["loadavg_end"] = _loadavg()
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    save()
    print(f"wrote {a.out} ({results['wall_s']} s)", flush=True)


if __name__ == "__main__":
    main()
