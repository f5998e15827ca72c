"""Training figures from ``metrics.jsonl`` (matplotlib, Agg): loss curves as small multiples
grouped by family, expert load per modality and trunk layer, fusion gate weights."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np

#: Loss families in panel order: (title, key prefix after ``loss/``). A key matches the
#: first family whose prefix it starts with.
FAMILIES = (
    ("contrastive", "nce_"),
    ("reconstruction", "recon_"),
    ("cross-modal reconstruction", "xrecon_"),
    ("translation (caption)", "caption_"),
    ("classification", "cls_"),
    ("MoE balance", "moe_"),
)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_series(records: list[dict[str, Any]], stage: str) -> dict[str, dict[int, float]]:
    """``{key: {step: value}}`` of every loss term of ``stage`` (a resumed step overwrites
    its first try)."""
    series: dict[str, dict[int, float]] = defaultdict(dict)
    for r in records:
        if r.get("stage") != stage or "step" not in r or r.get("event"):
            continue
        for k, v in r.items():
            if (k == "loss" or k.startswith("loss/")) and isinstance(v, int | float):
                if math.isfinite(v):
                    series[k][int(r["step"])] = float(v)
    return dict(series)


def smooth(y: np.ndarray, frac: float = 0.1) -> np.ndarray:
    """Exponential moving average with a span of ``frac`` of the series (bias-corrected)."""
    if len(y) < 3:
        return y
    alpha = 2.0 / (max(2.0, frac * len(y)) + 1.0)
    out = np.empty_like(y, dtype=float)
    acc, norm = 0.0, 0.0
    for i, v in enumerate(y):
        acc = (1 - alpha) * acc + alpha * v
        norm = (1 - alpha) * norm + alpha
        out[i] = acc / norm
    return out


def _panels(series: dict[str, dict[int, float]]) -> list[tuple[str, list[str]]]:
    """``[(title, keys)]``: the total, one panel per contrastive pair (small multiples), one
    per other family with a line per modality."""
    panels: list[tuple[str, list[str]]] = []
    if "loss" in series:
        panels.append(("total loss", ["loss"]))
    keys = sorted(k for k in series if k != "loss")
    grouped: dict[str, list[str]] = defaultdict(list)
    other = []
    for k in keys:
        name = k.removeprefix("loss/")
        fam = next((t for t, p in FAMILIES if name.startswith(p)), None)
        (grouped[fam].append(k) if fam else other.append(k))
    for title, prefix in FAMILIES:
        ks = grouped.get(title, [])
        if title == "contrastive":
            panels += [(f"InfoNCE {k.removeprefix('loss/' + prefix)}", [k]) for k in ks]
        elif ks:
            panels.append((title, ks))
    if other:
        panels.append(("other", other))
    return panels


def loss_small_multiples(
    records: list[dict[str, Any]], stage: str, path: str, ncols: int = 5
) -> str | None:
    """One panel per loss family (one per contrastive pair), raw (thin) under smoothed
    (thick) curves, a log y-axis where a panel spans more than a decade.

    Returns:
        ``path``, or None when ``stage`` has no loss records.
    """
    series = loss_series(records, stage)
    if not series:
        return None
    plt = _plt()
    panels = _panels(series)
    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.1 * ncols, 2.3 * nrows), squeeze=False, sharex=True
    )
    nce_vals = [v for k, pts in series.items() if "/nce_" in k for v in pts.values()]
    nce_lim = (0.0, max(nce_vals) * 1.05) if nce_vals else None
    for ax, (title, keys) in zip(axes.flat, panels, strict=False):
        lo, hi = math.inf, -math.inf
        for i, k in enumerate(keys):
            pts = series[k]
            xs = np.array(sorted(pts))
            ys = np.array([pts[x] for x in xs])
            color = f"C{i % 10}"
            ax.plot(xs, ys, color=color, lw=0.7, alpha=0.3)
            sm = smooth(ys)
            ax.plot(xs, sm, color=color, lw=1.8)
            if len(keys) > 1:  # direct labels at the line ends instead of a legend box
                label = k.removeprefix("loss/").split("_", 1)[-1]
                ax.annotate(
                    label,
                    (xs[-1], sm[-1]),
                    xytext=(2, 0),
                    textcoords="offset points",
                    fontsize=6,
                    color=color,
                    va="center",
                )
            if len(ys):
                lo, hi = min(lo, float(ys.min())), max(hi, float(ys.max()))
        if title.startswith("InfoNCE") and nce_lim:
            ax.set_ylim(*nce_lim)
        elif lo > 0 and hi / lo > 10:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
        ax.margins(x=0.12 if len(keys) > 1 else 0.02)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step", fontsize=7)
    fig.suptitle(f"{stage}: loss terms (thin: raw, thick: smoothed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _last_records(records: list[dict[str, Any]], key: str, frac: float = 0.2) -> list[dict]:
    """The last ``frac`` of the records of the last stage that logged ``key``."""
    rows = [r for r in records if r.get(key) and not r.get("event")]
    if not rows:
        return []
    stage = rows[-1].get("stage")
    rows = [r for r in rows if r.get("stage") == stage]
    return rows[-max(1, int(len(rows) * frac)) :]


def expert_load_heatmap(records: list[dict[str, Any]], path: str) -> str | None:
    """Share of each modality's tokens per expert and trunk layer (one panel per modality,
    rows = layers, columns = experts), averaged over the last fifth of the last stage's
    records. A uniform router gives 1/E everywhere.

    Returns:
        ``path``, or None without ``expert_load_layers`` records.
    """
    rows = _last_records(records, "expert_load_layers")
    if not rows:
        return None
    mods = list(rows[-1]["expert_load_layers"])
    mats = {}
    for m in mods:
        arr = [
            np.asarray(r["expert_load_layers"][m], float)
            for r in rows
            if m in r["expert_load_layers"]
        ]
        mats[m] = np.mean(arr, axis=0)
    plt = _plt()
    n = len(mods)
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    n_layers, n_exp = next(iter(mats.values())).shape
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(0.45 * n_exp * ncols + 1.5, 0.45 * n_layers * nrows + 1.4),
        squeeze=False,
    )
    vmax = max(float(m.max()) for m in mats.values())
    im = None
    for ax, m in zip(axes.flat, mods, strict=False):
        mat = mats[m]
        im = ax.imshow(mat, vmin=0.0, vmax=vmax, cmap="magma", aspect="auto")
        ax.set_title(m, fontsize=8)
        ax.set_xticks(range(mat.shape[1]))
        ax.set_yticks(range(mat.shape[0]))
        ax.tick_params(labelsize=6)
        ax.set_xlabel("expert", fontsize=7)
        ax.set_ylabel("layer", fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.subplots_adjust(hspace=0.7, wspace=0.35)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="share of tokens")
    fig.suptitle(
        f"Expert load per modality and layer ({rows[-1].get('stage')}, uniform = {1 / n_exp:.2f})",
        fontsize=10,
    )
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def gate_weights(records: list[dict[str, Any]], path: str) -> str | None:
    """Fusion gate weight per modality: smoothed over the steps of the stage that trains
    fusion (left) and the mean of its last fifth (right).

    Returns:
        ``path``, or None without ``gates`` records.
    """
    rows = [r for r in records if r.get("gates") and not r.get("event")]
    if not rows:
        return None
    stage = rows[-1].get("stage")
    rows = [r for r in rows if r.get("stage") == stage]
    mods = sorted({m for r in rows for m in r["gates"]})
    plt = _plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [3, 2]})
    tail = rows[-max(1, len(rows) // 5) :]
    means = []
    for i, m in enumerate(mods):
        xs = np.array([r["step"] for r in rows if m in r["gates"]])
        ys = np.array([r["gates"][m] for r in rows if m in r["gates"]])
        ax.plot(xs, ys, color=f"C{i}", lw=0.6, alpha=0.3)
        ax.plot(xs, smooth(ys), color=f"C{i}", lw=1.8, label=m)
        means.append(float(np.mean([r["gates"][m] for r in tail if m in r["gates"]] or [0.0])))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean gate weight")
    ax.set_title(f"{stage}: gate weight per modality", fontsize=9)
    ax.legend(fontsize=7, ncol=2, loc="best", framealpha=0.6)
    ax.grid(alpha=0.3)
    bx.barh(mods, means, color=[f"C{i}" for i in range(len(mods))])
    for y, v in enumerate(means):
        bx.text(v, y, f" {v:.2f}", va="center", fontsize=7)
    bx.set_xlim(0, max(means + [0.01]) * 1.2)
    bx.set_title("mean over the last fifth", fontsize=9)
    bx.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
