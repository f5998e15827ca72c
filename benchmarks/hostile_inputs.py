"""Cost of hostile inputs, before and after issue #21; slow clients against the service.

Three measurements, written to ``benchmarks/results/hostile_inputs.json``:

1. **Per input** (``tests/hostile_cases.py``: lying headers, allocation bombs, cost bombs, by
   attack class): wall time and peak memory of featurizing one file, each in a fresh
   measurement process, for this tree ("after") and for a ``git archive`` of ``--before``
   (default ``33944f9``, main before the fix). Every measurement process runs under an
   address-space cap (``--cap-gb``) and a timeout, so a bomb of the old code is stopped,
   not allowed to take the machine: a result of ``killed`` / ``oom`` / ``abort`` means the
   old code would have gone past the cap (the issue saw 18.8 GB for one PLY) or died.
   Peak memory is the largest resident set of the process and of its decoder children
   (``ru_maxrss``), minus nothing: the ``baseline_mb`` line is the same process after
   imports and one good input.
2. **Service** (this tree only): a small app (untrained tiny export; text, image, audio,
   video, point cloud) gets every hostile input over HTTP; replica restarts are counted
   (replica pids before/after, the router's ``replica_deaths``).
3. **Slow clients**: latency of a plain ``/v1/embeddings`` request while ``--slow`` clients
   are connected mid-body (headers and a few body bytes, then silence), vs. idle; the
   router admits ``max_inflight=8`` (the tiny serve config). Goal: within 2x of idle.

Quiet re-run (nothing else on the machine; ~3 min)::

    PYTHONPATH=. python benchmarks/hostile_inputs.py --slow 300 --repeats 3

Small run (what CI-sized machines can afford)::

    PYTHONPATH=. python benchmarks/hostile_inputs.py --slow 60 --repeats 1 --no-before
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

# The measurement process: featurize one file, report wall time and peak memory.
_MEASURE = r"""
import json, os, resource, sys, time
sys.path.insert(0, sys.argv[1])
from pipelines.featurize import SampleError, get_featurizer
modality, path, suffix, good, good_suffix = sys.argv[2:7]
f = get_featurizer(modality)
f.featurize(open(good, "rb").read(), suffix=good_suffix)  # imports, caches: the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
data = open(path, "rb").read()
t0 = time.perf_counter()
try:
    f.featurize(data, suffix=suffix)
    outcome = "accepted"
except SampleError as e:
    outcome = "refused:" + e.reason
wall = time.perf_counter() - t0
try:  # decoder children of the sandbox (after the fix), reaped so that they are counted
    from pipelines.featurize import sandbox
    for pid in list(getattr(sandbox, "_ZOMBIES", [])):
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
except ImportError:
    pass
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
           resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"outcome": outcome, "wall_s": wall, "peak_mb": peak / 1024,
                  "baseline_mb": base / 1024}))
"""


def _export_tree(ref: str, dest: Path) -> Path:
    """``git archive`` of ``ref`` into ``dest`` (no worktree, no checkout)."""
    blob = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", ref], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(blob)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def _limit(cap_gb: float):
    def pre() -> None:
        import resource

        cap = int(cap_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return pre


def measure_inputs(tree: Path, cap_gb: float, timeout_s: float, workdir: Path) -> list[dict]:
    """One measurement process per attack, against the code in ``tree``."""
    import numpy as np
    from hostile_cases import attacks

    from pipelines.featurize import get_featurizer

    rows = []
    goods: dict[str, tuple[Path, str]] = {}
    for a in attacks():
        if a.modality not in goods:
            data, suffix = get_featurizer(a.modality).example(np.random.default_rng(0), 1)
            p = workdir / f"good_{a.modality}{suffix}"
            p.write_bytes(data)
            goods[a.modality] = (p, suffix)
        path = workdir / f"{a.name}{a.suffix}"
        path.write_bytes(a.data)
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
        good, good_suffix = goods[a.modality]
        cmd = [sys.executable, "-c", _MEASURE, str(tree), a.modality, str(path), a.suffix,
               str(good), good_suffix]  # fmt: skip
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, env=env, capture_output=True, timeout=timeout_s, preexec_fn=_limit(cap_gb)
            )
            out = proc.stdout.decode().strip().splitlines()
            if proc.returncode == 0 and out:
                res = json.loads(out[-1])
            else:
                err = proc.stderr.decode(errors="replace")
                kind = "oom" if ("MemoryError" in err or "bad_alloc" in err) else "abort"
                res = {"outcome": f"{kind} (exit {proc.returncode}, cap {cap_gb:g} GB)",
                       "wall_s": time.perf_counter() - t0, "peak_mb": None}  # fmt: skip
        except subprocess.TimeoutExpired:
            res = {"outcome": f"killed after {timeout_s:g} s", "wall_s": timeout_s, "peak_mb": None}
        rows.append({"attack": a.name, "class": a.attack_class, "modality": a.modality,
                     "bytes": len(a.data), **res})  # fmt: skip
        print(f"  {a.attack_class:16s} {a.name:22s} {res['outcome']:38s} "
              f"{res['wall_s']:7.3f} s  peak {res.get('peak_mb') or float('nan'):7.0f} MB",
              flush=True)  # fmt: skip
    return rows


def worst_by_class(rows: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in rows:
        c = out.setdefault(r["class"], {"worst_wall_s": 0.0, "worst_peak_mb": 0.0, "failures": 0})
        c["worst_wall_s"] = max(c["worst_wall_s"], r["wall_s"])
        if r.get("peak_mb") is None:
            c["failures"] += 1  # crashed / killed: its memory is "over the cap"
        else:
            c["worst_peak_mb"] = max(c["worst_peak_mb"], r["peak_mb"])
    return out


# -- the service -----------------------------------------------------------------------------
def _post_latency(url: str, n: int) -> list[float]:
    import httpx

    lat = []
    with httpx.Client(base_url=url, timeout=60) as c:
        for i in range(n):
            t0 = time.perf_counter()
            r = c.post("/v1/embeddings", json={"input": f"a plain request {i}"})
            lat.append(time.perf_counter() - t0 if r.status_code == 200 else float("inf"))
    return lat


def _open_slow(url: str, n: int) -> list[socket.socket]:
    host, port = url.split("//")[1].split(":")
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)), timeout=120)
        s.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n" + b'{"input": "'
        )
        socks.append(s)
    return socks


def serve_measurements(n_slow: int, repeats: int, work: Path, hostile: bool = True) -> dict:
    import httpx
    import ray
    from hostile_cases import attacks
    from ray import serve

    from serve.app import build_app
    from serve.config import Limits
    from serve.devtools import DEFAULT_TEXTS, make_untrained_export

    try:
        from serve.proxy_guard import PROXY_CALLBACK_ENV, PROXY_CALLBACK_PATH

        os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK_PATH)
    except ImportError:  # the "before" tree has no proxy guard
        pass
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    export = make_untrained_export(work / "export", size="tiny", texts=list(DEFAULT_TEXTS))
    mods = ["text", "image", "audio", "video", "pointcloud"]
    args = {
        "export_dir": str(export),
        "modalities": mods,
        "model_name": "omniray-bench",
        "limits": {"max_inflight": 8, "max_body_bytes": 4 * 2**20}
        | ({"body_timeout_s": 120} if "body_timeout_s" in Limits.model_fields else {}),
        "features": {"pointcloud": {"max_points": 20000}},
    }
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    out: dict = {}
    try:

        def pids() -> dict[str, int]:
            return {
                m: serve.get_deployment_handle(f"{m}_encoder", "bench")
                .info.remote()
                .result()["pid"]
                for m in mods
            }

        if hostile:
            before = pids()
            codes: dict[str, int] = {}
            import base64

            with httpx.Client(base_url=url, timeout=120) as c:
                for a in attacks():
                    body = {"input": [{a.modality: base64.b64encode(a.data).decode()}]}
                    codes[a.name] = c.post("/v1/embeddings", json=body).status_code
            stats = serve.get_deployment_handle("router", "bench").stats.remote().result()
            restarts = sum(before[m] != p for m, p in pids().items())
            out["hostile_requests"] = {
                "status_codes": codes,
                "any_5xx": any(v >= 500 for v in codes.values()),
                "replica_restarts": restarts,
                "router_replica_deaths": stats.get("replica_deaths"),
            }
        _post_latency(url, 5)  # warm
        idle = sorted(x for _ in range(repeats) for x in _post_latency(url, 20))
        slow = _open_slow(url, n_slow)
        time.sleep(2.0)
        receiving = serve.get_deployment_handle("router", "bench").stats.remote().result()
        loaded = sorted(x for _ in range(repeats) for x in _post_latency(url, 20))
        for s in slow:
            s.close()
        med_idle, med_loaded = statistics.median(idle), statistics.median(loaded)
        out["slow_clients"] = {
            "slow_clients": n_slow,
            "router_receiving_while_loaded": receiving.get("receiving"),
            "idle_median_ms": round(med_idle * 1000, 2),
            "idle_p95_ms": round(idle[int(0.95 * (len(idle) - 1))] * 1000, 2),
            "loaded_median_ms": round(med_loaded * 1000, 2) if med_loaded != float("inf") else None,
            "loaded_p95_ms": round(loaded[int(0.95 * (len(loaded) - 1))] * 1000, 2)
            if loaded[-1] != float("inf")
            else None,
            "failed_while_loaded": sum(x == float("inf") for x in loaded),
            "ratio_median": round(med_loaded / med_idle, 2) if med_loaded != float("inf") else None,
        }
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", default="33944f9", help="git ref of the 'before' code")
    ap.add_argument("--no-before", action="store_true", help="skip the 'before' measurements")
    ap.add_argument("--no-serve", action="store_true", help="skip the service measurements")
    ap.add_argument("--cap-gb", type=float, default=3.0, help="address-space cap per input")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per input")
    ap.add_argument("--slow", type=int, default=300, help="slow clients connected")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of 20 plain requests")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/hostile_inputs.json"))
    ap.add_argument("--slow-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.slow_only:  # the slow-client measurement alone, against the code on PYTHONPATH
        with tempfile.TemporaryDirectory(prefix="omniray_hostile_bench_") as tmp:
            res = serve_measurements(a.slow, a.repeats, Path(tmp), hostile=False)
        Path(a.out).write_text(json.dumps(res))
        return
    result: dict = {
        "command": " ".join(sys.argv),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "cap_gb": a.cap_gb,
    }
    with tempfile.TemporaryDirectory(prefix="omniray_hostile_bench_") as tmp:
        work = Path(tmp)
        print("after (this tree):", flush=True)
        (work / "after").mkdir()
        after = measure_inputs(REPO, a.cap_gb, a.timeout, work / "after")
        result["after"] = {"inputs": after, "worst_by_class": worst_by_class(after)}
        if not a.no_before:
            print(f"before ({a.before}):", flush=True)
            tree = _export_tree(a.before, work / "before_tree")
            (work / "before").mkdir()
            before = measure_inputs(tree, a.cap_gb, a.timeout, work / "before")
            result["before"] = {
                "ref": a.before,
                "inputs": before,
                "worst_by_class": worst_by_class(before),
            }
        if not a.no_serve:
            print("service:", flush=True)
            result["service"] = serve_measurements(a.slow, a.repeats, work)
            print(json.dumps(result["service"], indent=1), flush=True)
            if not a.no_before:
                # The same slow clients against the old router (no hostile requests: they
                # would take its replicas down), in a process that imports the old tree.
                print(f"service, slow clients only ({a.before}):", flush=True)
                out = work / "before_slow.json"
                env = {**os.environ, "PYTHONPATH": str(work / "before_tree")}
                env.pop("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", None)  # not in that tree
                cmd = [sys.executable, str(Path(__file__).resolve()), "--slow-only",
                       "--slow", str(a.slow), "--repeats", str(a.repeats), "--out", str(out)]  # fmt: skip
                Path(a.out).write_text(json.dumps(result, indent=2))  # keep what we have
                proc = subprocess.run(cmd, env=env, cwd=str(work / "before_tree"))
                result["service_before"] = (
                    json.loads(out.read_text())
                    if proc.returncode == 0
                    else {"error": f"exit {proc.returncode}"}
                )
                print(json.dumps(result["service_before"], indent=1), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
