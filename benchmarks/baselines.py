"""Baselines a sceptic would fit first: a logistic regression per modality on the featurized
inputs of the training split, scored on the test split, next to OmniRay's zero-shot and
classifier-head accuracy per modality (from an evaluation's ``metrics.json``).

    python -m benchmarks.baselines --data data/omnidigits_prepared \
        [--metrics reports/eval/metrics.json] [--out benchmarks/results/baselines.json]

Features (one fixed-length vector per item, from the shards' featurized form, the same
arrays the model reads):

* a modality whose items vary in length along one axis (audio frames, signal channels) is
  zero-padded (or cropped) along that axis to the longest train item, then flattened;
* token ids (text) become a bag of tokens (counts over the vocabulary);
* point clouds (point order carries no meaning) become shape histograms: per-axis
  coordinate histograms, an x-y occupancy grid and the radius distribution;
* everything else (pixels, frames, signal samples, tabular fields) is flattened as stored.

Each modality: ``StandardScaler`` + ``LogisticRegression`` (lbfgs, multinomial), fitted on
the train rows that hold it and scored on the test rows that hold it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _pad(x: np.ndarray, axis: int, length: int) -> np.ndarray:
    x = np.moveaxis(np.asarray(x, dtype=np.float32), axis, 0)[:length]
    out = np.zeros((length, *x.shape[1:]), np.float32)
    out[: len(x)] = x
    return out


def pointcloud_features(points: np.ndarray, bins: int = 12) -> np.ndarray:
    """Shape histograms of a centred, unit-scaled ``(N, 3+)`` cloud."""
    p = np.asarray(points, dtype=np.float32)[:, :3]
    feats = [np.histogram(p[:, k], bins=bins, range=(-1, 1))[0] for k in range(3)]
    grid = np.histogram2d(p[:, 0], p[:, 1], bins=8, range=((-1, 1), (-1, 1)))[0].ravel()
    r = np.linalg.norm(p, axis=1)
    feats += [grid, np.histogram(r, bins=bins, range=(0, 1.0))[0]]
    return np.concatenate(feats).astype(np.float32) / max(1, len(p))


def featurize_split(
    tensors: list[np.ndarray | None],
    modality: str,
    length: int | None = None,
    vocab: int | None = None,
) -> tuple[np.ndarray, np.ndarray, int | None, int | None]:
    """``(rows, X, length, vocab)``: the indices of the rows holding ``modality``, their
    vectors, and the padded length / vocabulary used (pass them back for the test split)."""
    from common.modalities import get_modality

    rec = get_modality(modality)
    rows = np.array([i for i, t in enumerate(tensors) if t is not None], dtype=np.int64)
    items = [tensors[i] for i in rows]
    if modality == "pointcloud":
        X = np.stack([pointcloud_features(t) for t in items])
    elif np.issubdtype(np.dtype(rec.dtype), np.integer) and rec.rank == 1:
        vocab = vocab or int(max(int(np.max(t)) for t in items if len(t)) + 1)
        X = np.stack([np.bincount(np.clip(t, 0, vocab - 1), minlength=vocab) for t in items])
    elif rec.var_axis is not None:
        ax = rec.var_axis
        length = length or max(np.shape(t)[ax] for t in items)
        X = np.stack([_pad(t, ax, length).ravel() for t in items])
    else:
        X = np.stack([np.asarray(t, dtype=np.float32).ravel() for t in items])
    X = np.nan_to_num(X.astype(np.float32))
    return rows, X, length, vocab


def fit_baselines(data_dir: str | Path, *, c: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """Fits and scores one logistic regression per modality; returns the JSON dict."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from jobs.evaluation.data import load_split

    train, test = load_split(data_dir, "train"), load_split(data_dir, "test")
    out: dict[str, Any] = {}
    for m in train.modalities:
        if m not in test.modalities:
            continue
        t0 = time.perf_counter()
        tr_rows, Xtr, length, vocab = featurize_split(train.tensors[m], m)
        te_rows, Xte, _, _ = featurize_split(test.tensors[m], m, length, vocab)
        ytr = np.array([train.labels[i] for i in tr_rows], dtype=object)
        yte = np.array([test.labels[i] for i in te_rows], dtype=object)
        keep_tr, keep_te = ytr != None, yte != None  # noqa: E711 - elementwise on objects
        clf = make_pipeline(
            StandardScaler(),
            LogisticRegression(C=c, max_iter=500, random_state=seed),
        )
        clf.fit(Xtr[keep_tr], ytr[keep_tr].astype(str))
        acc = float(np.mean(clf.predict(Xte[keep_te]) == yte[keep_te].astype(str)))
        out[m] = {
            "accuracy": round(acc, 4),
            "n_train": int(keep_tr.sum()),
            "n_test": int(keep_te.sum()),
            "dims": int(Xtr.shape[1]),
            "fit_s": round(time.perf_counter() - t0, 2),
        }
    return {
        "method": f"logistic regression (StandardScaler, C={c}) on featurized inputs",
        "data": str(data_dir),
        "split": "test",
        "per_modality": out,
    }


def compare(baselines: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """Adds OmniRay's zero-shot / head accuracy per modality and whether it matches."""
    zs = (metrics.get("zero_shot") or {}).get("per_modality") or {}
    head = (metrics.get("classification") or {}).get("per_modality") or {}
    table = {}
    for m, b in baselines["per_modality"].items():
        z = (zs.get(m) or {}).get("accuracy")
        h = (head.get(m) or {}).get("accuracy")
        best = max([v for v in (z, h) if v is not None], default=None)
        table[m] = {
            "baseline": b["accuracy"],
            "omniray_zero_shot": z,
            "omniray_head": h,
            "omniray_matches_baseline": None if best is None else bool(best >= b["accuracy"]),
        }
    return table


def format_table(result: dict[str, Any]) -> str:
    rows = result.get("comparison") or {
        m: {"baseline": v["accuracy"]} for m, v in result["per_modality"].items()
    }
    lines = [f"{'modality':<11} {'baseline':>8} {'zero-shot':>9} {'head':>6}  ok"]
    for m, r in rows.items():
        z, h = r.get("omniray_zero_shot"), r.get("omniray_head")
        ok = r.get("omniray_matches_baseline")
        lines.append(
            f"{m:<11} {r['baseline']:>8.3f} {'' if z is None else f'{z:.3f}':>9} "
            f"{'' if h is None else f'{h:.3f}':>6}  {'' if ok is None else ('yes' if ok else 'NO')}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.baselines", description=__doc__.split("\n")[0]
    )
    p.add_argument("--data", required=True, help="prepared shards dir (train and test splits)")
    p.add_argument("--metrics", type=Path, default=None, help="an evaluation's metrics.json")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "baselines.json")
    p.add_argument("--C", type=float, default=1.0, help="inverse L2 strength")
    args = p.parse_args(argv)
    from jobs.console import log_path_for, quiet_console

    with quiet_console("baselines", log_path_for("baselines", args.out.parent)):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from jobs.console import say
    from jobs.evaluation.data import EvaluationError

    say(f"[baselines] logistic regression per modality on {args.data} (train -> test)")
    t0 = time.perf_counter()
    try:
        result = fit_baselines(args.data, c=args.C)
    except EvaluationError as e:
        say(f"benchmarks.baselines: error: {e}", err=True)
        return 2
    if args.metrics is not None:
        if not args.metrics.is_file():
            say(f"benchmarks.baselines: error: no {args.metrics}", err=True)
            return 2
        result["metrics"] = str(args.metrics)
        result["comparison"] = compare(result, json.loads(args.metrics.read_text()))
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(format_table(result))
    say(f"[baselines] {one_line(result)}")
    say(f"[baselines] wrote {args.out} in {result['wall_s']}s")
    return 0


def one_line(result: dict[str, Any]) -> str:
    """``baseline accuracy: text 0.94, ...`` or, with OmniRay's, ``OmniRay >= baseline on
    k/n modalities: text 0.97/0.94 ok, ...`` (OmniRay's best of zero-shot and head)."""
    comp = result.get("comparison")
    if not comp:
        cells = ", ".join(f"{m} {v['accuracy']:.2f}" for m, v in result["per_modality"].items())
        return f"baseline accuracy: {cells}"
    cells, n_ok = [], 0
    for m, r in comp.items():
        best = max(
            [v for v in (r["omniray_zero_shot"], r["omniray_head"]) if v is not None], default=None
        )
        ok = r["omniray_matches_baseline"]
        n_ok += bool(ok)
        cells.append(f"{m} {'-' if best is None else f'{best:.2f}'}/{r['baseline']:.2f}")
    return f"OmniRay/baseline accuracy, OmniRay >= baseline on {n_ok}/{len(comp)}: " + ", ".join(
        cells
    )


if __name__ == "__main__":
    sys.exit(main())
