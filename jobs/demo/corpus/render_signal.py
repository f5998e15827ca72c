"""Signal of the OmniDigits corpus: a noisy pen trajectory of the digit (``.npy`` float32
``(3, L)`` channels ``x, y, pen_down``, or CSV ``x,y,pen`` one step a line). The same
trajectories draw the ``draw``-style videos."""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from jobs.demo.corpus.plan import Writer


def _arc(
    cx: float, cy: float, rx: float, ry: float, a0: float, a1: float, k: int = 24
) -> list[tuple[float, float]]:
    """Points on an ellipse arc; angles in degrees, 0 = right, 90 = down (image coords)."""
    t = np.radians(np.linspace(a0, a1, k))
    return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in t]


def _strokes(d: int) -> list[list[tuple[float, float]]]:
    """Hand-designed pen strokes per digit in the unit square (x right, y down)."""
    if d == 0:
        return [_arc(0.5, 0.5, 0.3, 0.42, -90, 270, 40)]
    if d == 1:
        return [[(0.32, 0.28), (0.55, 0.08), (0.55, 0.92)]]
    if d == 2:
        return [_arc(0.5, 0.32, 0.28, 0.22, 200, 380, 20) + [(0.2, 0.9), (0.82, 0.9)]]
    if d == 3:
        return [_arc(0.48, 0.3, 0.27, 0.2, 210, 450, 22) + _arc(0.48, 0.7, 0.3, 0.22, -90, 150, 22)]
    if d == 4:
        return [[(0.62, 0.08), (0.15, 0.64), (0.86, 0.64)], [(0.66, 0.32), (0.66, 0.94)]]
    if d == 5:
        return [
            [(0.78, 0.1), (0.3, 0.1), (0.26, 0.46)] + _arc(0.5, 0.66, 0.3, 0.25, 230, 500, 26),
        ]
    if d == 6:
        return [[(0.7, 0.08)] + _arc(0.68, 0.62, 0.45, 0.54, 240, 180, 8)[1:]
                + _arc(0.5, 0.68, 0.27, 0.23, 180, 540, 30)]  # fmt: skip
    if d == 7:
        return [[(0.18, 0.1), (0.82, 0.1), (0.4, 0.92)], [(0.35, 0.52), (0.72, 0.52)]]
    if d == 8:
        return [_arc(0.5, 0.28, 0.22, 0.2, 90, 450, 30) + _arc(0.5, 0.7, 0.28, 0.22, -90, 270, 34)]
    if d == 9:
        return [_arc(0.48, 0.32, 0.25, 0.22, 0, 360, 30) + [(0.73, 0.32), (0.68, 0.92)]]
    raise ValueError(f"not a digit: {d}")


def _trajectory(d: int, writer: Writer, r: np.random.Generator) -> np.ndarray:
    """A pen trajectory of digit ``d``.

    Returns:
        float32 array (L, 3): columns x, y in [0, 1] (y down) and pen_down in {0, 1};
        L in [100, 300] depending on the writer's speed and the row.
    """
    shear = writer.slant + r.normal(0, 0.05)
    sx, sy = r.uniform(0.85, 1.1), r.uniform(0.85, 1.1)
    strokes = []
    for s in _strokes(d):
        p = np.asarray(s, dtype=np.float64)
        p = p + r.normal(0, 0.012, p.shape)  # the hand never repeats a stroke exactly
        p[:, 0] = 0.5 + sx * (p[:, 0] - 0.5) + shear * (0.5 - p[:, 1])
        p[:, 1] = 0.5 + sy * (p[:, 1] - 0.5)
        strokes.append(p)
    lengths = [float(np.sum(np.linalg.norm(np.diff(p, axis=0), axis=1))) for p in strokes]
    total = int(np.clip(round(sum(lengths) * 90 * writer.pen_speed * r.uniform(0.8, 1.25)),
                        100, 300))  # fmt: skip
    n_up = 6  # pen-up steps between strokes
    budget = total - n_up * (len(strokes) - 1)
    alloc = [max(10, int(budget * ln / sum(lengths))) for ln in lengths]
    alloc[-1] = max(10, budget - sum(alloc[:-1]))
    parts: list[np.ndarray] = []
    for p, steps in zip(strokes, alloc, strict=True):
        cum = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(p, axis=0), axis=1))])
        # Non-uniform speed: slower at the ends of a stroke than in the middle.
        u = np.linspace(0.0, 1.0, steps)
        a = r.uniform(0.3, 0.8)
        u = a * (0.5 - 0.5 * np.cos(np.pi * u)) + (1 - a) * u
        xy = np.stack([np.interp(u * cum[-1], cum, p[:, i]) for i in range(2)], axis=1)
        if parts:  # pen up: move from the previous stroke's end to this stroke's start
            s0, s1 = parts[-1][-1, :2], xy[0]
            t = np.linspace(0, 1, n_up + 2)[1:-1, None]
            parts.append(np.concatenate([s0 + t * (s1 - s0), np.zeros((n_up, 1))], axis=1))
        parts.append(np.concatenate([xy, np.ones((steps, 1))], axis=1))
    traj = np.concatenate(parts, axis=0)
    traj[:, :2] += r.normal(0, writer.noise, (len(traj), 2))
    return traj.astype(np.float32)


def _signal_bytes(traj: np.ndarray, fmt: str) -> bytes:
    """npy: float32 (3, L) channels-first; csv: header x,y,pen and L lines."""
    if fmt == "csv":
        lines = ["x,y,pen"] + [f"{x:.5f},{y:.5f},{int(p)}" for x, y, p in traj]
        return ("\n".join(lines) + "\n").encode()
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(traj.T, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def _ambiguous_trajectory(traj: np.ndarray, r: np.random.Generator) -> np.ndarray:
    """An interrupted pen trace: its first 20-35%, with a shaky hand."""
    keep = max(8, int(len(traj) * r.uniform(0.2, 0.35)))
    t = traj[:keep].copy()
    t[:, :2] += r.normal(0, 0.03, (keep, 2)).astype(np.float32)
    return t
