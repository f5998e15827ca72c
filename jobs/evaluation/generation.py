"""Evaluation of the generation heads that no generator can fool.

For every generation target, an **independent** classifier (a standardized logistic
regression, or a small shift-invariant 1-D CNN for sequence features; fitted on the *real*
featurized train items only, the generator never sees it) is fitted, and its own accuracy
on the real items of the evaluated split is reported beside every figure it produces (a figure whose classifier is below ``min_classifier_accuracy`` is
flagged ``"meaningful": false``). Features are chosen by each target's generation space
(``GenSpace.probe_features``, next to its encoder) so that the classifier reads the concept:
e.g. HOG of an image, log-mel frames of audio as a ``(bins, frames)`` sequence (padded as
the head pads them; read by the CNN), an order-free 3-D occupancy histogram of a point cloud.

Per direction ``source -> target`` (prompts: the split's rows with a label and the source):

* ``recognized``: fraction of generated samples the target's classifier assigns to the
  prompt's label (chance is 1 / classes);
* ``diversity``: mean distance between samples of one prompt with different seeds, divided
  by the mean distance between real items of the same class (0 = every seed gives the same
  sample; ~1 = as varied as real data);
* ``novelty``: median distance from a sample to its nearest *train* item, divided by the
  same for real held-out items (~1 = as far from the training set as unseen real data), and
  ``copies``: the fraction of samples closer to a train item than 0.1 of that reference.

A grid of samples (rows: classes, columns: seeds) per direction is drawn into ``reports``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class GenerationEvalConfig:
    """Settings of :func:`evaluate_generation`.

    Attributes:
        directions: ``[[source, target], ...]`` (default: each target's
            ``GenSpace.eval_sources``, :func:`models.generation.default_directions`, those
            the model and split support).
        max_prompts: Prompts per direction (split rows, balanced over labels).
        seeds: Samples per prompt (seeds 0..seeds-1), for recognition and diversity.
        steps: ODE steps (None: the export's default).
        max_train_rows: Train rows the classifiers (and novelty) use.
        min_classifier_accuracy: Below this held-out accuracy a classifier's figures are
            marked not meaningful.
        grid_seeds: Columns of the sample grids.
    """

    directions: list[list[str]] | None = None
    max_prompts: int = 100
    seeds: int = 2
    steps: int | None = None
    max_train_rows: int = 2000
    min_classifier_accuracy: float = 0.9
    grid_seeds: int = 4
    batch_size: int = 64
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- features
def classifier_features(target: str, items: Sequence[np.ndarray], model_cfg: Any) -> np.ndarray:
    """``(N, D)`` float32 features of featurized items of ``target`` for the classifiers:
    the target's ``GenSpace.probe_features`` (defined with its encoder)."""
    from models.generation import SPACES, GenerationConfig

    gen = GenerationConfig.from_model(model_cfg)
    return SPACES[target].for_model(model_cfg, gen, target).probe_features(items)


class SequenceCNN:
    """A small shift-invariant 1-D CNN over ``(N, C, L)`` sequence features: three
    convolutions (GELU, max pooling) and a global max over positions, trained with AdamW on
    per-channel standardized inputs with random shifts (seeded: the same data give the same
    classifier). The sequence probe of :func:`fit_classifier`.

    Args:
        width: Channels of the convolutions. epochs: Passes over the train items.
        seed: Seed of the initialization, the batches and the shifts.
    """

    kind = "1-D CNN (global max pooling)"

    def __init__(self, width: int = 96, epochs: int = 20, lr: float = 2e-3, seed: int = 0):
        self.width, self.epochs, self.lr, self.seed = width, epochs, lr, seed

    def fit(self, x: np.ndarray, y: np.ndarray) -> SequenceCNN:
        from torch import nn

        self.classes_ = np.asarray(sorted(set(y.tolist())))
        idx = {c: i for i, c in enumerate(self.classes_.tolist())}
        xt = torch.as_tensor(np.asarray(x, np.float32))
        yt = torch.as_tensor([idx[c] for c in y.tolist()])
        self.mu = xt.mean((0, 2), keepdim=True)
        self.sd = xt.std((0, 2), keepdim=True) + 1e-5
        xt = (xt - self.mu) / self.sd
        c, w = xt.shape[1], self.width
        g = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            self.net = nn.Sequential(
                nn.Conv1d(c, w, 5, padding=2), nn.GELU(), nn.MaxPool1d(2),
                nn.Conv1d(w, w, 5, padding=2), nn.GELU(), nn.MaxPool1d(2),
                nn.Conv1d(w, w, 3, padding=1), nn.GELU(), nn.AdaptiveMaxPool1d(1),
                nn.Flatten(), nn.Dropout(0.2), nn.Linear(w, len(self.classes_)),
            )  # fmt: skip
            opt = torch.optim.AdamW(self.net.parameters(), self.lr, weight_decay=1e-2)
            shift = max(1, xt.shape[2] // 16)
            self.net.train()
            with torch.enable_grad():
                for _ in range(self.epochs):
                    perm = torch.randperm(len(xt), generator=g)
                    for i in range(0, len(perm), 64):
                        b = perm[i : i + 64]
                        k = int(torch.randint(-shift, shift + 1, (1,), generator=g))
                        loss = nn.functional.cross_entropy(self.net(torch.roll(xt[b], k, 2)), yt[b])
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
        self.net.eval()
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Per-channel standardized, flattened (the space of diversity and novelty)."""
        z = (torch.as_tensor(np.asarray(x, np.float32)) - self.mu) / self.sd
        return z.flatten(1).numpy()

    def predict(self, x: np.ndarray) -> np.ndarray:
        z = (torch.as_tensor(np.asarray(x, np.float32)) - self.mu) / self.sd
        with torch.inference_mode():
            pred = torch.cat([self.net(z[i : i + 256]).argmax(1) for i in range(0, len(z), 256)])
        return self.classes_[pred.numpy()]


@dataclass
class TargetClassifier:
    """One target's classifier, fitted on real train items: a standardized logistic
    regression on ``(N, D)`` features, a :class:`SequenceCNN` on ``(N, C, L)`` ones."""

    target: str
    pipe: Any
    classes: list[str]
    accuracy: float
    n_train: int
    n_test: int
    train_feats: np.ndarray
    test_feats: np.ndarray
    test_labels: np.ndarray
    kind: str = "standardized logistic regression"

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.pipe.predict(x)

    def scaled(self, x: np.ndarray) -> np.ndarray:
        """Features in the classifier's standardized space, ``(N, D)``."""
        if isinstance(self.pipe, SequenceCNN):
            return self.pipe.transform(x)
        return self.pipe[0].transform(x)


def fit_classifier(
    target: str, train: Any, test: Any, model_cfg: Any, max_train_rows: int, seed: int = 0
) -> TargetClassifier | None:
    """Fits the target's classifier on real train items; scores it on real test items.

    The features are the target space's ``probe_features``: ``(N, D)`` -> a standardized
    logistic regression; ``(N, C, L)`` -> a :class:`SequenceCNN`.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def rows(split: Any, cap: int | None) -> tuple[list[np.ndarray], np.ndarray]:
        idx = [i for i in split.rows_with([target]) if split.labels[i] is not None]
        if cap is not None and len(idx) > cap:
            idx = list(np.random.default_rng(seed).choice(idx, cap, replace=False))
        return [split.tensors[target][i] for i in idx], np.asarray([split.labels[i] for i in idx])

    xtr, ytr = rows(train, max_train_rows)
    xte, yte = rows(test, None)
    if len(set(ytr.tolist())) < 2 or len(xte) == 0:
        return None
    ftr = classifier_features(target, xtr, model_cfg)
    fte = classifier_features(target, xte, model_cfg)
    if ftr.ndim == 3:
        pipe: Any = SequenceCNN(seed=seed).fit(ftr, ytr)
        kind = SequenceCNN.kind
    elif ftr.ndim == 2:
        pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.05))
        pipe.fit(ftr, ytr)
        kind = "standardized logistic regression"
    else:
        raise ValueError(
            f"{target}: probe_features must be (N, D) or (N, C, L), got shape {ftr.shape}"
        )
    acc = float((pipe.predict(fte) == yte).mean())
    return TargetClassifier(
        target, pipe, sorted(set(ytr.tolist())), acc, len(ytr), len(yte), ftr, fte, yte, kind
    )


# ----------------------------------------------------------------------------- metrics
def _embed(model: Any, source: str, items: list[np.ndarray], batch_size: int) -> torch.Tensor:
    from models.data import collate

    out = []
    with torch.inference_mode():
        for i in range(0, len(items), batch_size):
            b = collate([{source: x} for x in items[i : i + batch_size]], modalities=(source,))
            out.append(model.encode_features(source, b).embed.float())
    return torch.cat(out)


def _balanced(idx: np.ndarray, labels: list[Any], n: int, seed: int) -> list[int]:
    """Up to ``n`` of ``idx``, dealt round-robin over labels."""
    rng = np.random.default_rng(seed)
    by: dict[Any, list[int]] = {}
    for i in rng.permutation(idx).tolist():
        by.setdefault(labels[i], []).append(i)
    out: list[int] = []
    while len(out) < n and any(by.values()):
        for k in sorted(by, key=str):
            if by[k] and len(out) < n:
                out.append(by[k].pop())
    return out


def _pairwise_mean(x: np.ndarray) -> float:
    if len(x) < 2:
        return 0.0
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    return float(d[np.triu_indices(len(x), 1)].mean())


def _nn_dist(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    out = []
    for i in range(0, len(x), 256):
        d = ((x[i : i + 256, None] - ref[None]) ** 2).sum(-1)
        out.append(np.sqrt(d.min(1)))
    return np.concatenate(out)


def evaluate_direction(
    model: Any,
    source: str,
    target: str,
    data: Any,
    clf: TargetClassifier,
    cfg: GenerationEvalConfig,
) -> tuple[dict[str, Any], dict[str, list[np.ndarray]]]:
    """Figures of one direction, and the grid's samples ``{label: [sample per seed]}``."""
    idx = np.asarray(
        [i for i in data.rows_with([source]) if data.labels[i] in set(clf.classes)], np.int64
    )
    prompts = _balanced(idx, data.labels, cfg.max_prompts, seed=1)
    if not prompts:
        return {"skipped": f"no labelled rows with {source}"}, {}
    labels = np.asarray([data.labels[i] for i in prompts])
    cond = _embed(model, source, [data.tensors[source][i] for i in prompts], cfg.batch_size)
    k = max(cfg.seeds, 1)
    t0 = time.perf_counter()
    samples: list[list[np.ndarray]] = [[] for _ in prompts]
    for s in range(k):
        for i in range(0, len(prompts), cfg.batch_size):
            c = cond[i : i + cfg.batch_size]
            seeds = [s * 1_000_003 + j for j in range(i, i + len(c))]
            for j, item in enumerate(model.generate(target, c, seeds, steps=cfg.steps)):
                samples[i + j].append(item)
    gen_s = time.perf_counter() - t0
    flat = [x for per in samples for x in per]
    feats = classifier_features(target, flat, model.config)
    pred = clf.predict(feats).reshape(len(prompts), k)
    recognized = float((pred == labels[:, None]).mean())
    z = clf.scaled(feats).reshape(len(prompts), k, -1)
    # Diversity: seeds of one prompt vs real items of one class (classifier's scaled space).
    within = float(np.mean([_pairwise_mean(z[i]) for i in range(len(prompts))])) if k > 1 else 0.0
    real = clf.scaled(clf.test_feats)
    real_within = float(
        np.mean(
            [
                _pairwise_mean(real[clf.test_labels == c][:50])
                for c in clf.classes
                if (clf.test_labels == c).sum() > 1
            ]
        )
    )
    train_z = clf.scaled(clf.train_feats)
    nn_gen = _nn_dist(z.reshape(len(flat), -1), train_z)
    nn_real = _nn_dist(real, train_z)
    ref = float(np.median(nn_real))
    per_class = {
        c: round(float((pred[labels == c] == c).mean()), 4) for c in sorted(set(labels.tolist()))
    }
    res = {
        "prompts": len(prompts),
        "samples": len(flat),
        "recognized": round(recognized, 4),
        "recognized_per_class": per_class,
        "chance": round(1.0 / len(clf.classes), 4),
        "classifier_accuracy": round(clf.accuracy, 4),
        "meaningful": clf.accuracy >= cfg.min_classifier_accuracy,
        "diversity": round(within / real_within, 4) if real_within > 0 else None,
        "novelty": round(float(np.median(nn_gen)) / ref, 4) if ref > 0 else None,
        "copies": round(float((nn_gen < 0.1 * ref).mean()), 4),
        "sampling_s_per_item": round(gen_s / max(len(flat), 1), 5),
    }
    grid: dict[str, list[np.ndarray]] = {}
    for i, lab in enumerate(labels.tolist()):
        grid.setdefault(lab, samples[i])
    return res, grid


# ----------------------------------------------------------------------------- grids
def draw_grid(
    target: str, grid: dict[str, list[np.ndarray]], title: str, path: Path, model: Any, seeds: int
) -> Path:
    """Rows = classes, columns = up to ``seeds`` samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labs = sorted(grid, key=str)
    space = model.generators[target].space
    cols = max(1, min(seeds, max(len(v) for v in grid.values())))
    fig = plt.figure(figsize=(1.4 * cols + 0.6, 1.2 * len(labs) + 0.6))
    for r, lab in enumerate(labs):
        for c in range(cols):
            if c >= len(grid[lab]):
                continue
            x = np.asarray(grid[lab][c], np.float32)
            ax = fig.add_subplot(
                len(labs), cols, r * cols + c + 1, projection=space.plot_projection
            )
            space.plot(ax, x)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_title(str(lab), fontsize=7, loc="left")
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- entry
def evaluate_generation(
    model: Any,
    data: Any,
    train: Any,
    cfg: GenerationEvalConfig | None = None,
    reports_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Figures of every direction (see the module docstring).

    Args:
        model: An ``OmniModel`` with generation heads (``model.generators``).
        data: The evaluated split (``jobs.evaluation.data.SplitData``): prompts and the
            classifiers' held-out items.
        train: The train split: the classifiers' training items and the novelty reference.
        cfg: Settings.
        reports_dir: Where the grids go (None: no grids).

    Returns:
        ``{"classifiers": {target: {...}}, "directions": {"src->tgt": {...}}, "grids": [...]}``.
    """
    from models.generation import default_directions

    cfg = cfg or GenerationEvalConfig()
    if not len(getattr(model, "generators", {})):
        return {"skipped": "the export has no generation heads"}
    targets = list(model.generators)
    dirs = cfg.directions or [list(d) for d in default_directions(targets)]
    dirs = [d for d in dirs if d[1] in targets and d[0] in model.modalities and d[0] != d[1]]
    out: dict[str, Any] = {"classifiers": {}, "directions": {}, "grids": []}
    clfs: dict[str, TargetClassifier | None] = {}
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    for tgt in sorted({d[1] for d in dirs}):
        clf = fit_classifier(tgt, train, data, model.config, cfg.max_train_rows)
        clfs[tgt] = clf
        out["classifiers"][tgt] = (
            {"skipped": "too few labelled real items"}
            if clf is None
            else {
                "kind": clf.kind,
                "held_out_accuracy": round(clf.accuracy, 4),
                "train_items": clf.n_train,
                "test_items": clf.n_test,
                "meaningful": clf.accuracy >= cfg.min_classifier_accuracy,
            }
        )
    for src, tgt in dirs:
        clf = clfs.get(tgt)
        key = f"{src}->{tgt}"
        if clf is None:
            out["directions"][key] = {"skipped": f"no classifier for {tgt}"}
            continue
        res, grid = evaluate_direction(model, src, tgt, data, clf, cfg)
        out["directions"][key] = res
        if reports_dir is not None and grid:
            p = Path(reports_dir) / f"generation_{src}_to_{tgt}.png"
            title = f"{src} -> {tgt}: recognized {res['recognized']:.2f}"
            out["grids"].append(str(draw_grid(tgt, grid, title, p, model, cfg.grid_seeds)))
    rec = [
        v["recognized"] for v in out["directions"].values() if "recognized" in v and v["meaningful"]
    ]
    out["mean_recognized"] = round(float(np.mean(rec)), 4) if rec else None
    out["wall_time_s"] = round(time.perf_counter() - t0, 2)
    model.train(was_training)
    return out
