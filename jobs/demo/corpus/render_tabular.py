"""Tabular column of the OmniDigits corpus: one inline JSON record per row.

Numeric fields are stroke statistics measured on the row's real handwritten digit (the
scikit-learn scan that its image shows), with measurement noise; categorical fields are
metadata of the writer. Declared in ``configs/data/omnidigits.yaml`` (``features.tabular``):

* ``strokes``: pen strokes (digit-typical, some writers add one: a crossed 7, a serif 1);
* ``ink``: mean ink density of the scan (0-1);
* ``aspect``: width / height of the inked bounding box;
* ``top_ink`` / ``left_ink``: share of the ink in the upper / left half;
* ``holes``: enclosed background regions (0 for 1/2/3/5/7, 1 for 0/6/9/4, 2 for 8, when
  the 8x8 scan shows them);
* ``pen`` (vocab ``black|blue|green|red``, the writer's ink) and ``hand`` (``left|right``,
  hashed), which carry no digit information.

Each field is missing with probability 0.1 (at least one numeric stays). An ambiguous
record keeps only the metadata and a blurred ``ink``. Everything is drawn from the row's
own stream (``_TAG_TABULAR``), so the other modalities of the corpus do not depend on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from jobs.demo.corpus.plan import _INKS, _TAG_NEAR, _rng, _sklearn_digits

if TYPE_CHECKING:
    from jobs.demo.corpus.plan import RowPlan

_TAG_TABULAR, _TAG_HAND = 7, 8
_PENS: tuple[str, ...] = ("black", "blue", "green", "red")  # _INKS order
_STROKES = {0: 1, 1: 1, 2: 1, 3: 1, 4: 2, 5: 2, 6: 1, 7: 1, 8: 1, 9: 1}
_NUMERIC = ("strokes", "ink", "aspect", "top_ink", "left_ink", "holes")


def _holes(ink: np.ndarray) -> int:
    """Enclosed background regions of an (8, 8) scan (4-connected, not touching the border)."""
    from scipy import ndimage

    bg = np.pad(ink < 0.35, 1, constant_values=True)  # a frame of paper around the scan
    labels, n = ndimage.label(bg)
    return int(n - 1)  # every region but the one connected to the frame


def stroke_stats(image_src: int) -> dict[str, float]:
    """Noise-free statistics of one scikit-learn digit scan."""
    img = _sklearn_digits()[0][image_src] / 16.0  # (8, 8) ink in [0, 1]
    total = float(img.sum()) or 1.0
    rows, cols = np.nonzero(img > 0.25)
    h = (rows.max() - rows.min() + 1) if len(rows) else 1
    w = (cols.max() - cols.min() + 1) if len(cols) else 1
    return {
        "ink": float(img.mean()),
        "aspect": float(w / h),
        "top_ink": float(img[:4].sum() / total),
        "left_ink": float(img[:, :4].sum() / total),
        "holes": float(_holes(img)),
    }


def tabular_record(row: RowPlan, seed: int, *, ambiguous: bool) -> dict[str, Any]:
    """The inline record of ``row`` (a JSON object for the manifest)."""
    r = _rng(seed, _TAG_TABULAR, row.index)
    w = row.writer
    hand = "left" if _rng(seed, _TAG_HAND, w.wid).random() < 0.1 else "right"
    pen = _PENS[_INKS.index(w.ink)]
    st = stroke_stats(row.image_src)
    strokes = _STROKES[row.label] + int(r.random() < 0.2)
    rec: dict[str, Any] = {
        "strokes": strokes,
        "ink": round(st["ink"] * float(r.lognormal(0.0, 0.08)), 4),
        "aspect": round(st["aspect"] * float(r.lognormal(0.0, 0.08)), 4),
        "top_ink": round(float(np.clip(st["top_ink"] + r.normal(0, 0.03), 0, 1)), 4),
        "left_ink": round(float(np.clip(st["left_ink"] + r.normal(0, 0.03), 0, 1)), 4),
        "holes": int(st["holes"]),
        "pen": pen,
        "hand": hand,
    }
    drop = r.random(len(rec)) < 0.1
    drop[int(r.integers(len(_NUMERIC)))] = False  # at least one numeric field stays
    rec = {k: v for (k, v), d in zip(rec.items(), drop, strict=True) if not d}
    if ambiguous:  # only the writer's metadata and a blurred ink amount
        ink = round(float(r.uniform(0.2, 0.5)), 4)
        rec = {"ink": ink, "pen": pen, "hand": hand}
    return rec


def near_record(rec: dict[str, Any], r: np.random.Generator) -> dict[str, Any]:
    """A near duplicate's record: the same fields, re-measured (small noise)."""
    out = dict(rec)
    for k in ("ink", "aspect", "top_ink", "left_ink"):
        if k in out:
            out[k] = round(out[k] * float(r.lognormal(0.0, 0.02)), 4)
    return out


def row_record(row: RowPlan, rows: list[RowPlan], seed: int) -> dict[str, Any]:
    """The record of ``row`` as the manifest carries it: a duplicate repeats its source's
    record (an exact one byte for byte, a near one re-measured)."""
    src = rows[row.dup_of] if row.dup_of is not None else row
    rec = tabular_record(src, seed, ambiguous="tabular" in src.ambiguous)
    if row.dup_kind == "near":
        rec = near_record(rec, _rng(seed, _TAG_NEAR, row.index))
    return rec
