"""OmniRay on public classification sets with official splits, through the README's commands.

For each data set: write a manifest (``id,label,signal|image,split`` and, with ``--captions``,
a ``text`` caption), then run, as subprocesses, exactly what the README's "Bring your own
corpus" section tells a user to run::

    python -m jobs.prepare --manifest M --out SHARDS --config configs/data/omnidigits.yaml k=v...
    python -m jobs.train --config configs/train/small_labelled.yaml data.shards_dir=SHARDS name=N k=v...
    python -m jobs.evaluate --export RUNS/N/export --data SHARDS --split test --out EVAL

and report OmniRay's test accuracy (from evaluation's ``metrics.json``) next to a
logistic-regression baseline on simple features (time series: mean/std/min/max/slope per
channel; images: the pixels) and the published figure, with the wall time of each step.

Data sets (no download; they ship with packages):

* ``basicmotions``: aeon's BasicMotions (UEA): 4 activities, 6 channels (smartwatch
  accelerometer + gyroscope), length 100, official split 40/40.
* ``japanesevowels``: aeon's JapaneseVowels (UEA): 9 speakers, 12 LPC cepstrum channels,
  length 7-29 (variable), official split 270/370.
* ``digits``: scikit-learn's 8x8 handwritten digits (1,797 images) as PNG files, a fixed
  seeded stratified 75/25 split (there is no official one).

Published figures: the UEA multivariate bake-off (Ruiz et al., 2021, "The great multivariate
time series classification bake off") reports ~1.00 on BasicMotions and ~0.98 on
JapaneseVowels for ROCKET-class methods; cited here as "published".

Usage::

    .venv/bin/python benchmarks/public_datasets.py                     # all three, full runs
    .venv/bin/python benchmarks/public_datasets.py --datasets basicmotions --steps 5
    .venv/bin/python benchmarks/public_datasets.py --quick             # smoke: tiny model, few
                                                                       # rows and steps
Options: ``--datasets a,b`` ``--steps X`` (multiplies every stage's steps of the train config),
``--work DIR`` (keep manifests, shards, runs; default a temp dir removed at the end),
``--captions`` (add a ``text`` caption naming the label, trained with alignment; the test rows
carry theirs too, so only the ``signal``/``image`` figures are fair: fused and text ones see
the label),
``--normalize per_sample|dataset|none`` (signal normalization for every signal set; default
per data set), ``--train-config``, ``--out``. Writes ``benchmarks/results/public_datasets.json``
(``--quick``: ``public_datasets_quick.json`` in the temp dir) and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Per data set: its loader, the modality it fills, data-config overrides, published figure.
DATASETS: dict[str, dict] = {
    "basicmotions": {
        "modality": "signal",
        "what": "aeon BasicMotions: 4 activities, 6-channel watch accel+gyro, len 100",
        # Activity intensity is in the amplitude: per-dataset statistics keep it.
        "features": {
            "channels": None,
            "layout": "channels_first",
            "length": 128,
            "max_channels": 16,
            "normalize": "dataset",
        },
        "published": {"accuracy": 1.00, "source": "published (UEA bake-off, ROCKET-class)"},
        "train_config": "configs/train/small_labelled.yaml",
    },
    "japanesevowels": {
        "modality": "signal",
        "what": "aeon JapaneseVowels: 9 speakers, 12 LPC channels, len 7-29",
        # LPC cepstra: each channel's offset and scale carry the speaker.
        "features": {
            "channels": None,
            "layout": "channels_first",
            "length": 32,
            "max_channels": 16,
            "normalize": "dataset",
        },
        "published": {"accuracy": 0.98, "source": "published (UEA bake-off, ROCKET-class)"},
        "train_config": "configs/train/small_labelled.yaml",
    },
    "digits": {
        "modality": "image",
        "what": "scikit-learn digits: 10 classes, 8x8 grey, seeded stratified 75/25 split",
        "features": {"size": 32},
        "published": {"accuracy": None, "source": "no official split"},
        "train_config": "configs/train/small_labelled.yaml",
    },
}
DATA_CONFIG = "configs/data/omnidigits.yaml"
#: The train config when a data set names none (``--train-config`` overrides every set's).
TRAIN_CONFIG = "configs/train/demo_small.yaml"


# ---------------------------------------------------------------- data sets -> manifests
def load_dataset(name: str) -> tuple[list[np.ndarray], list[str], list[str]]:
    """``(items, labels, splits)``: items ``(C, L)`` float arrays or ``(H, W)`` uint8 images."""
    if name in ("basicmotions", "japanesevowels"):
        from aeon.datasets import load_basic_motions, load_japanese_vowels

        load = load_basic_motions if name == "basicmotions" else load_japanese_vowels
        items, labels, splits = [], [], []
        for split in ("train", "test"):
            x, y = load(split=split)
            for a, lab in zip(x, y, strict=True):
                a = np.asarray(a, np.float64)
                keep = ~np.isnan(a).any(0)  # drop any NaN padding at the end
                items.append(a[:, keep].astype(np.float32))
                labels.append(str(lab))
                splits.append(split)
        return items, labels, splits
    if name == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        idx = np.arange(len(d.target))
        tr, _ = train_test_split(idx, test_size=0.25, random_state=0, stratify=d.target)
        train = set(tr.tolist())
        imgs = [np.round(im * (255 / 16)).astype(np.uint8) for im in d.images]
        return imgs, [str(t) for t in d.target], ["train" if i in train else "test" for i in idx]
    raise SystemExit(f"unknown data set {name!r}; choose from {sorted(DATASETS)}")


def subsample(labels: list[str], splits: list[str], per_class: dict[str, int]) -> list[int]:
    """The first ``per_class[split]`` rows of each class in each split (quick mode)."""
    seen: dict[tuple[str, str], int] = {}
    keep = []
    for i, (lab, sp) in enumerate(zip(labels, splits, strict=True)):
        k = (sp, lab)
        if seen.get(k, 0) < per_class[sp]:
            seen[k] = seen.get(k, 0) + 1
            keep.append(i)
    return keep


def write_manifest(name: str, items, labels, splits, folder: Path, captions: bool) -> Path:
    """Files + ``manifest.csv`` (``id,label,<modality>,split[,text]``), paths relative."""
    from PIL import Image

    mod = DATASETS[name]["modality"]
    (folder / mod).mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (x, lab, sp) in enumerate(zip(items, labels, splits, strict=True)):
        rid = f"{name}-{sp}-{i:05d}"
        if mod == "image":
            rel = f"{mod}/{rid}.png"
            Image.fromarray(x).save(folder / rel)
        else:
            rel = f"{mod}/{rid}.npy"
            np.save(folder / rel, x)  # (C, L): channels first
        row = {"id": rid, "label": lab, mod: rel, "split": sp}
        if captions:
            row["text"] = caption(name, lab)
        rows.append(row)
    path = folder / "manifest.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def caption(name: str, label: str) -> str:
    return {"basicmotions": f"a person {label}", "japanesevowels": f"speaker {label}"}.get(
        name, f"the digit {label}"
    )


# ---------------------------------------------------------------- baseline
def summary_features(items: list[np.ndarray]) -> np.ndarray:
    """Per channel: mean, std, min, max and least-squares slope -> ``(N, 5 C)``."""
    out = []
    for a in items:
        t = np.linspace(-1.0, 1.0, a.shape[1]) if a.shape[1] > 1 else np.zeros(1)
        denom = max(float((t**2).sum()), 1e-12)
        slope = ((a - a.mean(1, keepdims=True)) * t).sum(1) / denom
        out.append(np.concatenate([a.mean(1), a.std(1), a.min(1), a.max(1), slope]))
    return np.stack(out)


def baseline(name: str, items, labels, splits) -> dict:
    """Standardized features + scikit-learn LogisticRegression, official train -> test."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    t0 = time.perf_counter()
    if DATASETS[name]["modality"] == "image":
        x, what = np.stack([im.reshape(-1) for im in items]).astype(np.float64), "pixels"
    else:
        x, what = summary_features(items), "mean/std/min/max/slope per channel"
    y = np.asarray(labels)
    tr = np.asarray(splits) == "train"
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, C=1.0))
    clf.fit(x[tr], y[tr])
    acc = float((clf.predict(x[~tr]) == y[~tr]).mean())
    return {"accuracy": round(acc, 4), "features": what, "seconds": _s(t0)}


# ---------------------------------------------------------------- the README's commands
def run_cmd(cmd: list[str], log: Path) -> dict:
    """Runs one job; its output goes to ``log``; returns rc and wall seconds."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    return {"rc": rc, "seconds": _s(t0), "log": str(log), "cmd": " ".join(cmd[1:])}


def _tail(path: str, n: int = 25) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])


def split_ids(shards: Path) -> dict[str, set[str]]:
    import pyarrow.parquet as pq

    out = {}
    for sp in ("train", "val", "test"):
        files = sorted((shards / sp).glob("*.parquet"))
        out[sp] = {i for f in files for i in pq.read_table(f, columns=["id"])["id"].to_pylist()}
    return out


def find_accuracies(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Every numeric value under a key with ``accuracy`` in its name, by dotted path."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(find_accuracies(v, path + "."))
        elif "accuracy" in str(k) and isinstance(v, int | float) and not isinstance(v, bool):
            out[path] = float(v)
    return out


def headline(accs: dict[str, float], modality: str) -> tuple[str | None, str | None]:
    """The per-sample classification accuracy (and its balanced one) of ``modality``."""

    def pick(cands):
        return min(cands, key=len) if cands else None

    plain = {p: v for p, v in accs.items() if "balanced" not in p}
    for rule in (
        lambda p: "classif" in p and modality in p,
        lambda p: "classif" in p,
        lambda p: modality in p and "zero" not in p,
        lambda p: "fused_accuracy" in p,
        lambda p: "zero" in p and modality in p,
    ):
        best = pick([p for p in plain if rule(p)])
        if best:
            head = best
            break
    else:
        return None, None
    bal = pick([p for p in accs if "balanced" in p and p.rsplit(".", 1)[0] in head])
    bal = bal or pick([p for p in accs if "balanced" in p and modality in p])
    return head, bal


def run_dataset(name: str, args, work: Path) -> dict:
    spec = DATASETS[name]
    mod = spec["modality"]
    d = work / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    items, labels, splits = load_dataset(name)
    if args.quick:
        keep = subsample(labels, splits, {"train": 6, "test": 3})
        items, labels, splits = ([v[i] for i in keep] for v in (items, labels, splits))
    res: dict = {
        "what": spec["what"],
        "rows": {sp: splits.count(sp) for sp in ("train", "test")},
        "classes": len(set(labels)),
        "published": spec["published"],
        "baseline_logreg": baseline(name, items, labels, splits),
    }
    t0 = time.perf_counter()
    manifest = write_manifest(name, items, labels, splits, d / "corpus", args.captions)
    res["manifest_seconds"] = _s(t0)

    feats = dict(spec["features"])
    if args.normalize and mod == "signal":
        feats["normalize"] = args.normalize
    # Unknown keys are refused by jobs.prepare itself (one line naming the key).
    fov = [f"features.{mod}.{k}={'null' if v is None else v}" for k, v in feats.items()]
    res["feature_overrides"] = fov
    py = sys.executable
    shards = d / "shards"
    prep = [py, "-m", "jobs.prepare", "--manifest", str(manifest), "--out", str(shards),
            "--config", DATA_CONFIG, "--num-cpus", str(args.num_cpus),
            "execution.progress_bars=false", *fov]  # fmt: skip
    steps = {}
    steps["prepare"] = run_cmd(prep, d / "prepare.log")
    res["steps"] = steps
    if steps["prepare"]["rc"] != 0:
        res["error"] = f"prepare failed:\n{_tail(steps['prepare']['log'])}"
        return res
    stats = json.loads((shards / "stats.json").read_text())
    res["rows_read"] = stats.get("rows_read")
    res["rows_written"] = (stats.get("rows_written") or {}).get("total")
    got = split_ids(shards)
    want = {sp: {f"{name}-{sp}-{i:05d}" for i, s in enumerate(splits) if s == sp}
            for sp in ("train", "test")}  # fmt: skip
    res["split_rows"] = {sp: len(v) for sp, v in got.items()}
    res["official_split_honoured"] = got["test"] == want["test"] and got["train"] <= want["train"]

    run_name = f"pub_{name}"
    runs = d / "runs"
    train_config = args.train_config or spec.get("train_config") or TRAIN_CONFIG
    res["train_config"] = train_config
    tc = load_train_yaml(train_config)
    tov = [f"data.shards_dir={shards}", f"name={run_name}", f"runs_dir={runs}"]
    stages = ["pretrain", "align", "finetune"] if args.captions else ["pretrain", "finetune"]
    for st in stages:
        n = max(1, round(tc[st]["steps"] * args.steps))
        tov += [f"{st}.steps={n}", f"{st}.checkpoint_every={n}",
                f"{st}.warmup_steps={min(tc[st].get('warmup_steps', 0), max(n // 5, 1))}"]  # fmt: skip
    # The demo config lists the demo's six-modality pairs: align what this corpus has.
    tov.append(f"align.pairs=[[text,{mod}]]" if args.captions else "align.pairs=null")
    if args.quick:
        tov += ["model=tiny", "log_every=1", "data.batch_size=4", "max_failures=0"]
    train = [py, "-m", "jobs.train", "--config", train_config, *tov,
             "--stages", ",".join(stages)]  # fmt: skip
    steps["train"] = run_cmd(train, d / "train.log")
    if steps["train"]["rc"] != 0:
        res["error"] = f"train failed:\n{_tail(steps['train']['log'])}"
        return res
    export = runs / run_name / "export"
    ev_out = d / "eval"
    ev = [py, "-m", "jobs.evaluate", "--export", str(export), "--data", str(shards),
          "--split", "test", "--out", str(ev_out)]  # fmt: skip
    steps["evaluate"] = run_cmd(ev, d / "evaluate.log")
    if steps["evaluate"]["rc"] != 0:
        res["error"] = f"evaluate failed:\n{_tail(steps['evaluate']['log'])}"
        return res
    metrics = json.loads((ev_out / "metrics.json").read_text())
    accs = find_accuracies(metrics)
    head, bal = headline(accs, mod)
    res["omniray"] = {
        "accuracy": None if head is None else round(accs[head], 4),
        "accuracy_key": head,
        "balanced_accuracy": None if bal is None else round(accs[bal], 4),
        "balanced_accuracy_key": bal,
        # The head on each row fused over its modalities (one modality here: its fusion).
        "zero_shot_accuracy": next(
            (
                round(v, 4)
                for k, v in accs.items()
                if "zero" in k and mod in k and "balanced" not in k
            ),
            None,
        ),
        "fused_accuracy": next(
            (round(v, 4) for k, v in accs.items() if "fused" in k and "balanced" not in k), None
        ),
        "all_accuracies": {k: round(v, 4) for k, v in accs.items()},
    }
    res["disk_mb_runs"] = round(_du(runs) / 2**20, 1)
    return res


def load_train_yaml(path: str) -> dict:
    import yaml

    return yaml.safe_load((ROOT / path).read_text())


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _s(t0: float) -> float:
    return round(time.perf_counter() - t0, 2)


def table(results: dict) -> str:
    head = (f"{'data set':<15} {'rows tr/te':>10} {'kept':>9} {'split ok':>8} {'OmniRay':>8} "
            f"{'bal.':>6} {'logreg':>7} {'publ.':>6} {'prep s':>7} {'train s':>8} {'eval s':>7}")  # fmt: skip
    lines = [head, "-" * len(head)]

    def f(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)

    for name, r in results.items():
        o, st = r.get("omniray") or {}, r.get("steps") or {}
        lines.append(
            f"{name:<15} {r['rows']['train']:>4}/{r['rows']['test']:<5} "
            f"{f(r.get('rows_written'), '{}')}/{f(r.get('rows_read'), '{}'):<4} "
            f"{str(r.get('official_split_honoured', '-')):>8} {f(o.get('accuracy')):>8} "
            f"{f(o.get('balanced_accuracy')):>6} {f(r['baseline_logreg']['accuracy']):>7} "
            f"{f(r['published']['accuracy'], '{:.2f}'):>6} "
            + " ".join(
                f"{f((st.get(s) or {}).get('seconds'), '{:.1f}'):>{w}}"
                for s, w in (("prepare", 7), ("train", 8), ("evaluate", 7))
            )
        )
        if r.get("error"):
            lines.append(f"  ERROR {r['error'].splitlines()[0]} (see {work_logs(r)})")
    return "\n".join(lines)


def work_logs(r: dict) -> str:
    st = r.get("steps") or {}
    return ", ".join(v["log"] for v in st.values() if v.get("rc"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--steps", type=float, default=1.0, help="scale of every stage's steps")
    ap.add_argument("--work", default=None, help="keep everything here (default: temp dir)")
    ap.add_argument("--quick", action="store_true", help="smoke: tiny model, few rows/steps")
    ap.add_argument("--captions", action="store_true", help="add text captions + align")
    ap.add_argument("--normalize", default=None, help="per_sample|dataset|none for signals")
    ap.add_argument("--train-config", default=None,
                    help="one train config for every set (default: each set's own)")  # fmt: skip
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick and args.steps == 1.0:
        args.steps = 0.03
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    for n in names:
        if n not in DATASETS:
            ap.error(f"unknown data set {n!r}; choose from {sorted(DATASETS)}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="pubdata_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.out:
        out = Path(args.out)
    elif args.quick:  # smoke figures are not results
        out = Path(tempfile.gettempdir()) / "public_datasets_quick.json"
    else:
        out = ROOT / "benchmarks/results/public_datasets.json"
    result: dict = {
        "benchmark": "public_datasets",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        "quick": args.quick,
        "steps_scale": args.steps,
        "captions": args.captions,
        "train_config": args.train_config or "per data set (see each set's train_config)",
        "data_config": DATA_CONFIG,
        "datasets": {},
    }
    try:
        for n in names:
            print(f"== {n} ...", flush=True)
            r = result["datasets"][n] = run_dataset(n, args, work)
            print(json.dumps({k: v for k, v in r.items() if k != "steps"}, default=str)[:600])
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(table(result["datasets"]))
    print(f"load before {result['loadavg_before']} after {result['loadavg_after']}; wrote {out}")
    return 1 if any(r.get("error") for r in result["datasets"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
