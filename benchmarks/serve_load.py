"""Load test of the OmniRay service over real HTTP (asyncio + httpx), JSON out.

Measures, against the app deployed on 127.0.0.1 (a private local Ray, a free port):

0. the image encoder alone (no HTTP): fp32 vs INT8, batch 1 vs 32, for ``--model-sizes``;
1. p50/p99 latency and throughput of ``/v1/embeddings`` for text, image and audio at
   concurrency 1, 8 and 32 (fp32, dynamic batching on);
2. dynamic batching off vs on at concurrency 32 (image; target >= 2x throughput);
3. INT8 vs fp32 replicas at concurrency 32 (image, text, audio; target >= 1.5x);
4. a replica killed under load (``ray.kill`` of one of two image replicas): failed requests
   (target <= 1 %) and recovery time (until Serve reports two running replicas again).

Every cell is bounded by ``--seconds`` and ``--max-requests``. With no ``--export`` an
*untrained* export of ``--size`` (default ``small``) is written to ``runs/serve_bench/``
(speed does not depend on the weights); inputs are real files of the OmniDigits corpus
(``--corpus``, built small when absent).

    .venv/bin/python benchmarks/serve_load.py                  # full run (~6-10 min on 2 cores)
    .venv/bin/python benchmarks/serve_load.py --quick          # smoke run (~2-3 min)
    .venv/bin/python benchmarks/serve_load.py --export runs/demo/export --phases load,int8

Writes ``benchmarks/results/serve_load.json`` (override with ``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
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

APP = "omniray_bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentiles(lat: list[float]) -> dict[str, float | None]:
    if not lat:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "mean_ms": None}
    a = np.asarray(lat) * 1000
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 2),
        "p90_ms": round(float(np.percentile(a, 90)), 2),
        "p99_ms": round(float(np.percentile(a, 99)), 2),
        "mean_ms": round(float(a.mean()), 2),
    }


def _role(cmdline: list[str], me: int, pid: int) -> str:
    """Which part of the serving stack a process is (Ray sets its workers' titles)."""
    if pid == me:
        return "load_generator"
    title = " ".join(cmdline)
    if "ProxyActor" in title:
        return "http_proxy"
    if "ServeReplica" in title:
        # ray::ServeReplica:<app>:<deployment>
        return "replica:" + title.split("ServeReplica:", 1)[1].split()[0].split(":")[-1]
    if "ServeController" in title:
        return "serve_controller"
    if any(k in title for k in ("gcs_server", "raylet", "ray/_private", "ray/dashboard")):
        return "ray_system"
    return "other"


def _cpu_snapshot() -> dict[int, tuple[str, float]]:
    """``{pid: (role, cpu seconds so far)}`` of every process on the machine."""
    import psutil

    me = os.getpid()
    out = {}
    for proc in psutil.process_iter(["pid", "cmdline", "cpu_times"]):
        try:
            t = proc.info["cpu_times"]
            if t is None:
                continue
            out[proc.info["pid"]] = (
                _role(proc.info["cmdline"] or [], me, proc.info["pid"]),
                t.user + t.system,
            )
        except (psutil.Error, OSError):
            continue
    return out


def _cpu_per_request(before: dict, after: dict, ok: int, wall: float) -> dict[str, Any]:
    """CPU milliseconds per answered request, by role (processes alive for the whole cell),
    and how busy the machine's cores were: where a request's cost goes."""
    by_role: dict[str, float] = {}
    for pid, (role, t1) in after.items():
        if pid in before:
            by_role[role] = by_role.get(role, 0.0) + max(0.0, t1 - before[pid][1])
    total = sum(by_role.values())
    n = max(ok, 1)
    return {
        "cpu_ms_per_request": {
            k: round(v * 1e3 / n, 2) for k, v in sorted(by_role.items(), key=lambda kv: -kv[1])
        },
        "cpu_ms_per_request_total": round(total * 1e3 / n, 2),
        "cores_busy": round(total / wall, 2) if wall else None,
    }


async def _load(
    url: str,
    bodies: list[dict],
    concurrency: int,
    seconds: float,
    max_requests: int,
    events: list | None = None,
) -> dict[str, Any]:
    """Closed-loop load: ``concurrency`` workers, each sending its next request as soon as
    the previous one is answered, until the time or request budget is spent."""
    import httpx

    lat: list[float] = []
    statuses: dict[int, int] = {}
    sent = 0
    t_end = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker(wid: int) -> None:
            nonlocal sent
            i = wid
            while time.perf_counter() < t_end and sent < max_requests:
                sent += 1
                body = bodies[i % len(bodies)]
                i += concurrency
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/embeddings", json=body)
                    code = r.status_code
                except httpx.HTTPError:
                    code = -1  # connection error / timeout: counted as failed
                dt = time.perf_counter() - t0
                statuses[code] = statuses.get(code, 0) + 1
                if code == 200:
                    lat.append(dt)
                if events is not None:
                    events.append((time.perf_counter(), code, dt))

        cpu0 = _cpu_snapshot()
        t0 = time.perf_counter()
        await asyncio.gather(*[worker(w) for w in range(concurrency)])
        wall = time.perf_counter() - t0
        cpu1 = _cpu_snapshot()
    ok = statuses.get(200, 0)
    return {
        "concurrency": concurrency,
        "requests": sum(statuses.values()),
        "ok": ok,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "wall_s": round(wall, 2),
        "throughput_rps": round(ok / wall, 2) if wall else None,
        **_percentiles(lat),
        **_cpu_per_request(cpu0, cpu1, ok, wall),
    }


#: File types used as inputs (the corpus also plants rarer formats and corrupt files).
_COMMON_SUFFIXES: dict[str, set[str]] = {
    "image": {".png", ".jpg"},
    "audio": {".wav"},
    "video": {".mp4"},
    "pointcloud": {".ply", ".pcd", ".xyz"},
    "signal": {".npy", ".csv"},
}


def _inputs(corpus: Path, modality: str, n: int = 16, per_request: int = 1) -> list[dict]:
    """Request bodies with ``per_request`` real inputs each (corpus files, base64)."""
    rows = [json.loads(x) for x in (corpus / "manifest.jsonl").read_text().splitlines() if x]
    bad = set()
    info = corpus / "corpus_info.json"
    if info.is_file():
        ci = json.loads(info.read_text())
        for key in ("corrupt", "corrupt_files"):
            for c in ci.get(key, []) or []:
                bad.add(c.get("path") if isinstance(c, dict) else str(c))
    bodies = []
    for r in rows:
        v = r.get(modality)
        if not v or v in bad:
            continue
        if modality == "text":
            bodies.append({"input": [{"text": v}]})
        else:
            p = corpus / v
            if p.suffix not in _COMMON_SUFFIXES[modality]:
                continue  # keep the common formats; the corpus plants odd ones too
            bodies.append({"input": [{modality: base64.b64encode(p.read_bytes()).decode()}]})
        if len(bodies) >= n:
            break
    if not bodies:
        raise RuntimeError(f"no {modality} inputs in {corpus}")
    if per_request > 1:
        items = [b["input"][0] for b in bodies]
        bodies = [
            {"input": [items[(i + j) % len(items)] for j in range(per_request)]}
            for i in range(len(items))
        ]
    return bodies


def _model_phase(sizes: list[str], work: Path) -> dict[str, Any]:
    """Encoder-only throughput (no HTTP): fp32 vs INT8, batch 1 vs 32, one thread.

    Separates what batching and INT8 do to the model from the serving overhead.
    """
    import torch

    from models.data import collate
    from serve.devtools import make_untrained_export
    from serve.runtime import load_model

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    for size in sizes:
        export = work / f"export_{size}"
        if not _loads(export):
            make_untrained_export(export, size=size)
        res: dict[str, Any] = {}
        for quant in ("none", "int8"):
            model = load_model(export, modalities=["image"], parts=[], quantization=quant)
            for bsz in (1, 32):
                batch = collate(
                    [
                        {"image": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)}
                        for _ in range(bsz)
                    ],
                    modalities=("image",),
                )
                with torch.inference_mode():
                    model.encode_features("image", batch)
                    n, t0 = 0, time.perf_counter()
                    while time.perf_counter() - t0 < 3.0 or n < 3:
                        model.encode_features("image", batch)
                        n += 1
                    dt = (time.perf_counter() - t0) / n
                res[f"{quant}_b{bsz}"] = {
                    "ms_per_batch": round(dt * 1000, 2),
                    "items_per_s": round(bsz / dt, 1),
                }
        res["batching_speedup_b32_vs_b1"] = round(
            res["none_b32"]["items_per_s"] / res["none_b1"]["items_per_s"], 2
        )
        res["int8_speedup_b32"] = round(
            res["int8_b32"]["items_per_s"] / res["none_b32"]["items_per_s"], 2
        )
        out[size] = res
        print(f"  model {size}: {res}", flush=True)
    return out


def _deploy(args: dict[str, Any]) -> None:
    from ray import serve

    from serve.app import build_app

    t0 = time.perf_counter()
    serve.run(build_app(args), name=APP, route_prefix="/")
    print(f"  deployed in {time.perf_counter() - t0:.1f}s", flush=True)


async def _check_inputs(url: str, bodies: dict[str, list[dict]]) -> None:
    """Drops inputs the service refuses (e.g. corrupt corpus files) before measuring."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        for m, bs in bodies.items():
            keep = []
            for b in bs:
                r = await c.post("/v1/embeddings", json=b)
                if r.status_code == 200:
                    keep.append(b)
            if not keep:
                raise RuntimeError(f"service refused every {m} input")
            bodies[m] = keep


def _warm(url: str, bodies: dict[str, list[dict]]) -> None:
    for m in bodies:
        asyncio.run(_load(url, bodies[m], 4, 2.0, 40))


def _replica_kill(url: str, body_list: list[dict], a: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    events: list = []
    names: set[str] = set()
    handle = serve.get_deployment_handle("image_encoder", APP)
    for _ in range(40):
        names.add(handle.stats.remote().result()["actor_name"])
        if len(names) >= 2:
            break
    if len(names) < 2:
        return {"skipped": f"found {len(names)} image replicas, need 2"}
    victim = sorted(names)[0]
    kill_at: dict[str, float] = {}

    async def run() -> dict[str, Any]:
        async def killer() -> None:
            await asyncio.sleep(a.kill_after)
            kill_at["t"] = time.perf_counter()
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)

        res, _ = await asyncio.gather(
            _load(url, body_list, a.kill_concurrency, a.kill_seconds, 10**9, events), killer()
        )
        return res

    res = asyncio.run(run())
    t_kill = kill_at["t"]
    # Recovery: until the controller reports both replicas running again.
    recovered = None
    deadline = time.perf_counter() + 120
    while time.perf_counter() < deadline:
        st = serve.status().applications[APP].deployments["image_encoder"]
        running = st.replica_states.get("RUNNING", 0)
        if running >= 2 and time.perf_counter() > t_kill + 0.5:
            recovered = time.perf_counter()
            break
        time.sleep(0.25)
    failed = sum(1 for _, code, _ in events if code != 200)
    after = [dt for t, code, dt in events if t >= t_kill and code == 200]
    return {
        "victim": victim,
        "concurrency": a.kill_concurrency,
        "requests": len(events),
        "failed": failed,
        "failed_pct": round(100 * failed / max(1, len(events)), 3),
        "target_failed_pct_max": 1.0,
        "statuses": res["statuses"],
        "recovery_s_until_2_replicas_running": (
            round(recovered - t_kill, 2) if recovered is not None else None
        ),
        "latency_after_kill": _percentiles(after),
        "latency_overall": {k: res[k] for k in ("p50_ms", "p99_ms")},
    }


def _loads(export: Path) -> bool:
    """Whether a cached untrained export exists and still fits the current model code (an
    export written before a change to the encoders would fail to load: rebuild it)."""
    if not (export / "model.safetensors").is_file():
        return False
    from models.model import OmniModel

    try:
        OmniModel.from_pretrained(export)
    except (KeyError, RuntimeError, ValueError) as e:
        print(f"rebuilding {export}: it no longer fits the model ({type(e).__name__})", flush=True)
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", help="export dir (default: untrained --size export)")
    ap.add_argument("--size", default="small")
    ap.add_argument("--corpus", default=None, help="OmniDigits corpus dir for inputs")
    ap.add_argument("--work", default=str(REPO / "runs" / "serve_bench"))
    ap.add_argument("--modalities", default="text,image,audio")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--seconds", type=float, default=8.0, help="per cell")
    ap.add_argument("--max-requests", type=int, default=1500, help="per cell")
    ap.add_argument("--phases", default="model,load,batching,int8,kill,others")
    ap.add_argument(
        "--others",
        default="video,pointcloud,signal",
        help="modalities of the 'others' phase (c=8 latency only)",
    )
    ap.add_argument("--kill-concurrency", type=int, default=8)
    ap.add_argument("--kill-seconds", type=float, default=15.0)
    ap.add_argument("--kill-after", type=float, default=4.0)
    ap.add_argument("--items-per-request", type=int, default=8)
    ap.add_argument("--model-sizes", default="small", help="sizes of the 'model' phase")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--quick", action="store_true", help="short cells (smoke run)")
    ap.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for the local Ray (its workers inherit it), e.g. Ray Serve's "
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0; repeatable",
    )
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve_load.json"))
    a = ap.parse_args(argv)
    if a.quick:
        a.seconds, a.max_requests, a.kill_seconds, a.kill_after = 3.0, 300, 8.0, 2.5

    import ray
    import yaml
    from ray import serve

    from serve.devtools import DEFAULT_TEXTS, make_untrained_export

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus = Path(a.corpus) if a.corpus else REPO / "data" / "omnidigits"
    if not (corpus / "manifest.jsonl").is_file():
        corpus = work / "corpus"
        if not (corpus / "manifest.jsonl").is_file():
            from jobs.demo.corpus import build_corpus

            print(f"building a 60-row corpus in {corpus}", flush=True)
            build_corpus(corpus, n=60, seed=0, workers=2, overwrite=True)
    if a.export:
        export, trained = Path(a.export), True
    else:
        export, trained = work / f"export_{a.size}", False
        if not _loads(export):
            texts = list(DEFAULT_TEXTS) + [
                json.loads(x).get("text") or ""
                for x in (corpus / "manifest.jsonl").read_text().splitlines()
                if x
            ]
            print(f"writing an untrained {a.size} export to {export}", flush=True)
            make_untrained_export(export, size=a.size, texts=[t for t in texts if t])
    model_cfg = yaml.safe_load((export / "model_config.yaml").read_text())

    mods = a.modalities.split(",")
    concs = [int(c) for c in a.concurrency.split(",")]
    phases = set(a.phases.split(","))
    base_args: dict[str, Any] = {
        "export_dir": str(export),
        "modalities": mods,
        "model_name": "omniray-bench",
        "limits": {"max_inflight": 1024, "request_timeout_s": 60},
        "batching": {
            "enabled": True,
            "max_batch_size": 32,
            "max_batch_cost": 8192,
            "batch_wait_timeout_s": 0.005,
        },
        "deployment_options": {
            f"{m}_encoder": {"max_ongoing_requests": 128, "max_queued_requests": 1024} for m in mods
        },
    }
    results: dict[str, Any] = {
        "benchmark": "serve_load",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {
            "size": model_cfg.get("name", a.size),
            "export": str(export),
            "trained": trained,
            "d_model": model_cfg.get("d_model"),
            "trunk_layers": model_cfg.get("trunk_layers"),
            "num_experts": model_cfg.get("num_experts"),
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "note": "the load generator, HTTP proxy, router and replicas all share these "
            "cores; other load on the machine shows in loadavg_start/loadavg_end",
            "loadavg_start": os.getloadavg(),
        },
        "settings": {
            "seconds_per_cell": a.seconds,
            "max_requests_per_cell": a.max_requests,
            "concurrency": concs,
            "modalities": mods,
            "torch_threads_per_replica": 1,
            "batching": base_args["batching"],
            "env": a.env,
        },
        "targets": {
            "batching_speedup_image_c32": 2.0,
            "int8_speedup_c32": 1.5,
            "p99_ms_at_c8_max": 500,
            "replica_kill_failed_pct_max": 1.0,
        },
    }
    if Path(a.out).is_file() and not phases >= {"load", "batching", "int8", "kill"}:
        # A partial re-run (some phases) keeps the other phases' figures of the last run.
        previous = json.loads(Path(a.out).read_text())
        results = {**previous, **{k: v for k, v in results.items() if k != "summary"}}
    for kv in a.env:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            raise SystemExit(f"--env wants KEY=VALUE, got {kv!r}")
        os.environ[key] = value
    temp = tempfile.mkdtemp(prefix="ray_sb_", dir="/tmp")
    ray.init(
        address="local",
        num_cpus=a.num_cpus,
        include_dashboard=False,
        _temp_dir=temp,
        configure_logging=False,
        log_to_driver=False,
    )
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    bodies = {m: _inputs(corpus, m) for m in mods}

    def save() -> None:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(results, indent=2))

    try:
        if "model" in phases:
            print("model-level image encoder throughput (1 thread)", flush=True)
            results["model_level_image"] = _model_phase(a.model_sizes.split(","), work)
            save()
        if phases & {"load", "batching", "int8"}:
            print("deploy fp32, batching on", flush=True)
            _deploy(base_args)
            asyncio.run(_check_inputs(url, bodies))
            _warm(url, bodies)
            results["load_fp32_batched"] = {}
            for m in mods:
                for c in concs if "load" in phases else [32]:
                    r = asyncio.run(_load(url, bodies[m], c, a.seconds, a.max_requests))
                    results["load_fp32_batched"].setdefault(m, {})[f"c{c}"] = r
                    print(
                        f"  {m:6s} c={c:<3d} {r['throughput_rps']:8.1f} rps  "
                        f"p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  {r['statuses']}",
                        flush=True,
                    )
            save()
        if "batching" in phases:
            # Batching merges items across requests; it pays off where the model's work
            # dominates the per-request overhead (proxy, router, handles): also measured
            # with several images per request.
            multi = _inputs(corpus, "image", per_request=a.items_per_request)
            on_multi = asyncio.run(_load(url, multi, 32, a.seconds, a.max_requests))
            print("deploy fp32, batching OFF", flush=True)
            off = json.loads(json.dumps(base_args))
            off["batching"]["enabled"] = False
            _deploy(off)
            _warm(url, {"image": bodies["image"]})
            r = asyncio.run(_load(url, bodies["image"], 32, a.seconds, a.max_requests))
            off_multi = asyncio.run(_load(url, multi, 32, a.seconds, a.max_requests))
            on = results["load_fp32_batched"]["image"]["c32"]
            k = a.items_per_request
            results["batching_off_vs_on_image_c32"] = {
                "one_image_per_request": {
                    "off": r,
                    "on": on,
                    "speedup": round(on["throughput_rps"] / r["throughput_rps"], 2),
                },
                f"{k}_images_per_request": {
                    "off": off_multi,
                    "on": on_multi,
                    "items_per_s_off": round(off_multi["throughput_rps"] * k, 1),
                    "items_per_s_on": round(on_multi["throughput_rps"] * k, 1),
                    "speedup": round(on_multi["throughput_rps"] / off_multi["throughput_rps"], 2),
                },
            }
            for key, v in results["batching_off_vs_on_image_c32"].items():
                print(f"  batching speedup (image, c=32, {key}): {v['speedup']}x", flush=True)
            save()
        if "int8" in phases:
            print("deploy INT8, batching on", flush=True)
            q = json.loads(json.dumps(base_args))
            q["quantization"] = "int8"
            _deploy(q)
            _warm(url, bodies)
            out = {}
            for m in mods:
                r = asyncio.run(_load(url, bodies[m], 32, a.seconds, a.max_requests))
                fp = results["load_fp32_batched"][m]["c32"]
                out[m] = {
                    "int8": r,
                    "fp32": fp,
                    "speedup": round(r["throughput_rps"] / fp["throughput_rps"], 2),
                }
                print(
                    f"  int8 {m:6s} c=32 {r['throughput_rps']:8.1f} rps "
                    f"({out[m]['speedup']}x fp32)",
                    flush=True,
                )
            results["int8_vs_fp32_c32"] = out
            save()
        if "others" in phases:
            others = a.others.split(",")
            print(f"deploy {others}, c=8 latency", flush=True)
            o = json.loads(json.dumps(base_args))
            o["modalities"] = others
            o["deployment_options"] = {
                f"{m}_encoder": {"max_ongoing_requests": 128, "max_queued_requests": 1024}
                for m in others
            }
            _deploy(o)
            ob = {m: _inputs(corpus, m) for m in others}
            asyncio.run(_check_inputs(url, ob))
            _warm(url, ob)
            results["load_fp32_batched_c8_other_modalities"] = {}
            for m in others:
                r = asyncio.run(_load(url, ob[m], 8, a.seconds, a.max_requests))
                results["load_fp32_batched_c8_other_modalities"][m] = r
                print(
                    f"  {m:10s} c=8 {r['throughput_rps']:8.1f} rps  p50 {r['p50_ms']} ms  "
                    f"p99 {r['p99_ms']} ms  {r['statuses']}",
                    flush=True,
                )
            save()
        if "kill" in phases:
            print("deploy 2 image replicas, kill one under load", flush=True)
            k = json.loads(json.dumps(base_args))
            k["modalities"] = ["image"]
            k["deployment_options"] = {
                "image_encoder": {"num_replicas": 2, "max_ongoing_requests": 128}
            }
            _deploy(k)
            _warm(url, {"image": bodies["image"]})
            results["replica_kill"] = _replica_kill(url, bodies["image"], a)
            print(f"  replica kill: {results['replica_kill']}", flush=True)
            save()
    finally:
        results["machine"]["loadavg_end"] = os.getloadavg()
        save()
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    summary = {}
    if "load_fp32_batched" in results:
        summary["p99_ms_c8"] = {
            m: v.get("c8", {}).get("p99_ms") for m, v in results["load_fp32_batched"].items()
        }
    for m, v in results.get("load_fp32_batched_c8_other_modalities", {}).items():
        summary.setdefault("p99_ms_c8", {})[m] = v.get("p99_ms")
    if "batching_off_vs_on_image_c32" in results:
        summary["batching_speedup"] = {
            k: v["speedup"] for k, v in results["batching_off_vs_on_image_c32"].items()
        }
    if "model_level_image" in results:
        summary["model_level"] = {
            k: {x: v[x] for x in ("batching_speedup_b32_vs_b1", "int8_speedup_b32")}
            for k, v in results["model_level_image"].items()
        }
    if "int8_vs_fp32_c32" in results:
        summary["int8_speedup"] = {m: v["speedup"] for m, v in results["int8_vs_fp32_c32"].items()}
    if "replica_kill" in results:
        summary["kill_failed_pct"] = results["replica_kill"].get("failed_pct")
        summary["kill_recovery_s"] = results["replica_kill"].get(
            "recovery_s_until_2_replicas_running"
        )
    results["summary"] = summary
    save()
    print(json.dumps(summary, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
