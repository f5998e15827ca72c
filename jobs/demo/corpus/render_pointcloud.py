"""Point cloud of the OmniDigits corpus: the digit glyph as a 3D text mesh (open3d),
area-sampled to 1024-2048 points, rotated/scaled/jittered; PLY (some PCD/XYZ)."""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from jobs.demo.corpus.plan import RowPlan


@lru_cache(maxsize=10)
def _glyph_mesh(d: int) -> tuple[np.ndarray, np.ndarray]:
    """The digit as a 3D text mesh, cached per process: (vertices (V, 3), triangles (T, 3))."""
    import open3d as o3d

    mesh = o3d.t.geometry.TriangleMesh.create_text(str(d), depth=4.0)
    v = mesh.vertex.positions.numpy().astype(np.float64)
    t = mesh.triangle.indices.numpy().astype(np.int64)
    return v, t


def _sample_mesh(v: np.ndarray, t: np.ndarray, n: int, r: np.random.Generator) -> np.ndarray:
    """Area-weighted uniform samples on a triangle mesh. Returns (n, 3) float64."""
    a, b, c = v[t[:, 0]], v[t[:, 1]], v[t[:, 2]]
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    tri = r.choice(len(t), size=n, p=area / area.sum())
    u, w = r.random((2, n))
    flip = u + w > 1  # reflect into the triangle
    u[flip], w[flip] = 1 - u[flip], 1 - w[flip]
    return a[tri] + u[:, None] * (b[tri] - a[tri]) + w[:, None] * (c[tri] - a[tri])


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = (math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay),
                              math.cos(az), math.sin(az))  # fmt: skip
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _render_points(row: RowPlan, r: np.random.Generator) -> np.ndarray:
    """The digit glyph as a point cloud. Returns float64 (N, 3), N in 1024-2048."""
    v, t = _glyph_mesh(row.label)
    n = int(r.choice([1024, 1536, 2048]))
    p = _sample_mesh(v, t, n, r)
    p -= p.mean(axis=0)
    p /= np.abs(p[:, 1]).max()  # glyph height ~ 2 units
    p *= r.uniform(0.8, 1.2, 3) * r.uniform(0.5, 3.0)  # anisotropic and global scale
    ang = np.radians(r.uniform(-15, 15, 3))
    p = p @ _rotation(*ang).T + r.uniform(-0.5, 0.5, 3)
    return p + r.normal(0, 0.01, p.shape)


def _write_points(p: np.ndarray, path: Path) -> None:
    import open3d as o3d

    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(p))
    if not o3d.io.write_point_cloud(str(path), pcd, write_ascii=path.suffix == ".xyz"):
        raise RuntimeError(f"open3d could not write {path}")


def _ambiguous_points(p: np.ndarray, r: np.random.Generator) -> np.ndarray:
    """A partial scan: only the points on one side of a random plane (about a third)."""
    d = r.normal(size=3)
    d /= np.linalg.norm(d)
    proj = p @ d
    return p[proj <= np.quantile(proj, r.uniform(0.25, 0.4))]
