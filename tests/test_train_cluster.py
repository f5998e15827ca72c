"""Training on real clusters, each in a subprocess (a pytest process holds one Ray connection,
and the session's ``ray_local`` holds it):

* ``ray job submit`` of a short ``jobs.train`` run against a head node started here with
  ``ray start --head --block`` (stopped by terminating that process, never a global
  ``ray stop`` that would hit colleagues' clusters);
* a two-node ``ray.cluster_utils.Cluster`` with the two workers spread over both nodes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from jobs.training.metrics import read_jsonl
from jobs.training.synthetic import write_synthetic_shards

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
VENV_BIN = str(Path(PY).parent)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env.pop("RAY_ADDRESS", None)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PYTHONPATH"] = str(ROOT)
    # A short-lived cluster on 127.0.0.1 only: no token auth (with a token in ~/.ray, `ray
    # start` would enable it and the job client here would have to find the same token).
    env["RAY_AUTH_MODE"] = "disabled"
    return env


def _losses(run_dir: Path, stage: str) -> list[dict]:
    return [
        r
        for r in read_jsonl(str(run_dir / "metrics.jsonl"))
        if r.get("stage") == stage and "loss" in r
    ]


@pytest.mark.slow
def test_ray_job_submit_against_a_local_head(tmp_path):
    shards = write_synthetic_shards(str(tmp_path / "shards"), n=48, seed=1)
    port, dash = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rjs_", dir="/tmp")  # short: unix socket path limit
    env = _env()
    head = subprocess.Popen(
        [
            f"{VENV_BIN}/ray",
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            # Every port of our own: colleagues' clusters hold the defaults on this machine.
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--ray-client-server-port={_free_port()}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 120
        while time.time() < deadline:  # wait until the dashboard's job API answers
            ok = subprocess.run(
                [f"{VENV_BIN}/ray", "job", "list", "--address", address],
                env=env,
                capture_output=True,
            )
            if ok.returncode == 0:
                break
            time.sleep(2)
        runtime_env = {
            "working_dir": str(ROOT),
            "excludes": [".venv", ".git", "data", "runs", "reports", "*.egg-info"],
        }
        cmd = [
            f"{VENV_BIN}/ray",
            "job",
            "submit",
            "--address",
            address,
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--",
            "python",
            "-m",
            "jobs.train",
            "--config",
            "configs/train/tiny.yaml",
            "--stages",
            "pretrain",
            f"data.shards_dir={shards}",
            f"runs_dir={tmp_path}",
            "name=submitted",
            "scaling.num_workers=1",
            "pretrain.steps=3",
            "pretrain.checkpoint_every=3",
        ]
        for _ in range(30):  # the dashboard's job agent comes up after its HTTP server
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
            if "No available agent" not in proc.stdout + proc.stderr:
                break
            time.sleep(4)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "succeeded" in (proc.stdout + proc.stderr).lower()
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
    run_dir = tmp_path / "submitted"
    assert [r["step"] for r in _losses(run_dir, "pretrain")] == [1, 2, 3]
    assert (run_dir / "export" / "model.safetensors").is_file()


CLUSTER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from jobs.training.config import load_train_config
    from jobs.training.runner import run_training

    shards, runs, temp = sys.argv[1:4]
    ports = [int(x) for x in sys.argv[4].split(",")]

    def own_ports(i):
        # Colleagues' clusters hold the default agent ports on this machine.
        return {"dashboard_agent_listen_port": ports[3 * i], "metrics_export_port": ports[3 * i + 1],
                "runtime_env_agent_port": ports[3 * i + 2]}

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False, "temp_dir": temp,
        "object_store_memory": 300_000_000, **own_ports(0)})
    cluster.add_node(num_cpus=2, object_store_memory=300_000_000, **own_ports(1))
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        tc = load_train_config("configs/train/tiny.yaml", [
            f"data.shards_dir={shards}", f"runs_dir={runs}", "name=two_nodes",
            "scaling.num_workers=2", "scaling.cpus_per_worker=0.5",
            "scaling.placement_strategy=SPREAD", "pretrain.steps=3",
            "pretrain.checkpoint_every=3"])
        res = run_training(tc, ["pretrain"])
        print("RESULT " + json.dumps({"export": res["export_dir"]}))
    finally:
        ray.shutdown()
        cluster.shutdown()
    """
)


@pytest.mark.slow
def test_two_node_cluster(tmp_path):
    shards = write_synthetic_shards(str(tmp_path / "shards"), n=48, seed=2)
    script = tmp_path / "two_nodes.py"
    script.write_text(CLUSTER_SCRIPT)
    temp_dir = tempfile.mkdtemp(prefix="rcl_", dir="/tmp")
    ports = ",".join(str(_free_port()) for _ in range(6))
    # Its own session, so that on a timeout the whole tree (raylets, GCS) is killed too.
    proc = subprocess.Popen(
        [PY, str(script), shards, str(tmp_path), temp_dir, ports],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=540)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert "RESULT" in out
    run_dir = tmp_path / "two_nodes"
    assert [r["step"] for r in _losses(run_dir, "pretrain")] == [1, 2, 3]
    assert (run_dir / "export" / "model.safetensors").is_file()
