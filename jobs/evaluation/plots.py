"""Evaluation figures (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: jobs run on cluster nodes without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.modalities import modality_names  # noqa: E402

#: Scatter markers, one per modality in table order (cycled past the end).
_MARKER_CYCLE = ("o", "s", "^", "D", "P", "X", "v", "<", ">", "*", "h")


def _marker(modality: str) -> str:
    """The modality's scatter marker: its position in the modality table picks it."""
    names = modality_names()
    if modality not in names:
        return _MARKER_CYCLE[0]
    return _MARKER_CYCLE[names.index(modality) % len(_MARKER_CYCLE)]


def retrieval_heatmap(
    matrix: np.ndarray,
    modalities: Sequence[str],
    emergent: set[tuple[str, str]],
    path: Path,
    title: str = "Cross-modal retrieval R@1 (query → gallery)",
) -> Path:
    """Heatmap of R@1, rows = query modality, columns = gallery modality.

    Args:
        matrix: (M, M) R@1 values; NaN where not measured (diagonal, skipped pairs).
        emergent: ordered pairs never seen together in training; hatched and starred.
    """
    m = len(modalities)
    fig, ax = plt.subplots(figsize=(1.3 * m + 2.5, 1.2 * m + 1.8))
    masked = np.ma.masked_invalid(matrix)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    im = ax.imshow(masked, vmin=0.0, vmax=1.0, cmap=cmap)
    ax.set_xticks(range(m), modalities, rotation=35, ha="right")
    ax.set_yticks(range(m), modalities)
    ax.set_xlabel("gallery")
    ax.set_ylabel("query")
    for i, a in enumerate(modalities):
        for j, b in enumerate(modalities):
            v = matrix[i, j]
            star = "*" if (a, b) in emergent else ""
            if (a, b) in emergent:
                ax.add_patch(
                    plt.Rectangle(
                        (j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", edgecolor="white", lw=0
                    )
                )
            text = "—" if np.isnan(v) else f"{v:.2f}{star}"
            color = "black" if np.isnan(v) or v > 0.6 else "white"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(
        title + ("\n* hatched: emergent (never paired in training)" if emergent else ""),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def embedding_projection(
    points: np.ndarray,
    labels: Sequence[str | None],
    modalities: Sequence[str],
    path: Path,
    method: str = "pca",
    seed: int = 0,
) -> Path:
    """2-D projection of embeddings from all modalities, colour = label, marker = modality.

    Args:
        points: (N, E) embeddings.
        labels: (N,) label per point (None: grey).
        modalities: (N,) modality per point.
    """
    if method == "tsne" and len(points) > 5:
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, (len(points) - 1) // 3)))
        xy = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)
    else:
        from sklearn.decomposition import PCA

        ncomp = min(2, points.shape[0], points.shape[1])
        xy = PCA(ncomp, random_state=seed).fit_transform(points)
        if xy.shape[1] < 2:
            xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    names = sorted({str(x) for x in labels if x is not None})
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    colours = {n: cmap(i % cmap.N) for i, n in enumerate(names)}
    fig, ax = plt.subplots(figsize=(7.5, 6))
    lab = np.asarray([str(x) if x is not None else "" for x in labels], dtype=object)
    mods = np.asarray(modalities, dtype=object)
    for mod in dict.fromkeys(modalities):
        sel = mods == mod
        c = [colours.get(x, (0.6, 0.6, 0.6, 1.0)) for x in lab[sel]]
        ax.scatter(
            xy[sel, 0],
            xy[sel, 1],
            c=c,
            marker=_marker(mod),
            s=18,
            alpha=0.75,
            linewidths=0,
            label=mod,
        )
    mod_legend = ax.legend(title="modality", loc="upper right", fontsize=8)
    ax.add_artist(mod_legend)
    if names and len(names) <= 20:
        handles = [plt.Line2D([], [], marker="o", ls="", color=colours[n]) for n in names]
        ax.legend(handles, names, title="label", loc="lower right", fontsize=7, ncol=2)
    ax.set_title(f"Shared embedding space ({method.upper()}, {len(points)} points)")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy_bars(
    values: dict[str, float],
    path: Path,
    title: str,
    chance: float | None = None,
    highlight: str | None = None,
) -> Path:
    """Bar chart of accuracies per name, with an optional chance line."""
    names = list(values)
    fig, ax = plt.subplots(figsize=(1.0 * len(names) + 2.5, 3.8))
    colours = ["#d95f02" if n == highlight else "#1b9e77" for n in names]
    bars = ax.bar(names, [values[n] for n in names], color=colours)
    for b, n in zip(bars, names, strict=True):
        ax.text(
            b.get_x() + b.get_width() / 2,
            values[n] + 0.01,
            f"{values[n]:.2f}",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    if chance is not None:
        ax.axhline(chance, color="grey", ls="--", lw=1, label=f"chance {chance:.2f}")
        ax.legend(fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def confusion_matrices(
    matrices: dict[str, np.ndarray],
    class_names: Sequence[str],
    path: Path,
    title: str,
    subtitles: dict[str, str] | None = None,
) -> Path:
    """Confusion matrices side by side, each normalized per true class (row = recall).

    Args:
        matrices: name -> (C, C) counts (rows = true class, columns = predicted).
        class_names: (C,) names of rows and columns.
        subtitles: name -> text under the panel name (e.g. the accuracies).
    """
    names = list(matrices)
    c = len(class_names)
    side = min(6.0, 1.6 + 0.32 * c)
    cols = min(len(names), 3)
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols + 0.8, side * rows + 0.6))
    axes = np.atleast_1d(axes).ravel()
    ticks = c <= 30
    for ax, name in zip(axes, names, strict=False):
        m = np.asarray(matrices[name], dtype=np.float64)
        frac = m / np.maximum(m.sum(axis=1, keepdims=True), 1e-12)
        ax.imshow(frac, vmin=0.0, vmax=1.0, cmap="Blues")
        if ticks:
            ax.set_xticks(range(c), [str(x)[:12] for x in class_names], rotation=60, ha="right")
            ax.set_yticks(range(c), [str(x)[:12] for x in class_names])
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        if c <= 12:
            for i in range(c):
                for j in range(c):
                    if m[i, j] > 0:
                        color = "white" if frac[i, j] > 0.6 else "black"
                        ax.text(
                            j, i, f"{m[i, j]:g}", ha="center", va="center", fontsize=7, color=color
                        )
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        sub = (subtitles or {}).get(name)
        ax.set_title(name + (f"\n{sub}" if sub else ""), fontsize=9)
    for ax in axes[len(names) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
