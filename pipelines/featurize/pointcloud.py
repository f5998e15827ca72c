"""Point-cloud featurizer: PLY/PCD/XYZ (open3d) -> float16 (N, 3[+3][+3]).

Points are centred on their mean, scaled into the unit sphere and reduced to
``num_points`` by farthest-point sampling (open3d); smaller clouds are tiled. Optional
normals and colours are appended as extra channels.
"""

from __future__ import annotations

import os
import sys
import tempfile
import types
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.featurize import register
from pipelines.featurize.base import (
    Featurizer,
    SampleError,
    Written,
    check_finite,
    normalize_suffix,
)


def import_open3d() -> types.ModuleType:
    """``import open3d`` without its web visualizer (dash, plotly): ~0.4 s instead of ~0.8 s.

    ``open3d/__init__.py`` imports ``open3d.visualization`` unconditionally, whose
    ``draw_plotly`` pulls in dash and plotly, about half of the import time of every
    worker and replica that reads a point cloud; reading and sampling need neither.
    While open3d itself is imported, a placeholder stands in for that subpackage; it is
    removed afterwards, so a later ``import open3d.visualization`` loads the real one
    (the ``open3d.visualization`` attribute exists only after that import). In an
    IPython kernel open3d may enable its web visualizer on import: a plain import there.
    """
    if "open3d" in sys.modules or "IPython" in sys.modules:
        import open3d

        return open3d
    name = "open3d.visualization"
    placeholder = types.ModuleType(name)
    sys.modules[name] = placeholder
    try:
        import open3d
    finally:
        if sys.modules.get(name) is placeholder:
            del sys.modules[name]
        if getattr(sys.modules.get("open3d"), "visualization", None) is placeholder:
            delattr(sys.modules["open3d"], "visualization")
    return open3d


@register("pointcloud")
class PointCloudFeaturizer(Featurizer):
    """Point clouds -> float16 (num_points, C), C = 3 (+3 normals) (+3 colours)."""

    @dataclass
    class Config:
        """Point clouds -> float16 (num_points, 3 [+3 normals] [+3 colours]).

        Attributes:
            num_points: N after farthest-point sampling (smaller clouds are tiled).
            normals: Append normals (zeros when the file has none).
            colors: Append RGB colours in [0, 1] (zeros when the file has none).
            max_points: Clouds with more points are ``too_large``.
        """

        num_points: int = 256
        normals: bool = False
        colors: bool = False
        max_points: int = 5_000_000

        @property
        def num_channels(self) -> int:
            return 3 + 3 * int(self.normals) + 3 * int(self.colors)

    suffixes = (".ply", ".pcd", ".xyz", ".xyzn", ".xyzrgb", ".pts")

    def warm_up(self) -> None:
        import_open3d()  # ~0.4 s on first import

    def output_shape(self) -> tuple[int, int]:
        c = self.section
        return (c.num_points, c.num_channels)

    @classmethod
    def sniff(cls, data: bytes) -> str | None:
        head = data[:256].lstrip()
        if head.startswith(b"ply"):
            return ".ply"
        if head.startswith(b"# .PCD") or head.startswith(b"VERSION") or b"FIELDS" in head:
            return ".pcd"
        first = head.split(b"\n", 1)[0].split()
        try:
            if len(first) >= 3 and all(np.isfinite(float(v)) for v in first):
                return ".xyz"
        except ValueError:
            pass
        return None

    def example(self, rng: np.random.Generator, label: int = 0) -> tuple[bytes, str]:
        """An ASCII PLY of 300 noisy points on a curve whose winding number is ``label`` + 1
        (a flat ring for 0, a helix turning ``label`` + 1 times otherwise)."""
        t = np.sort(rng.uniform(0, 2 * np.pi, 300))
        k = int(label) % 10 + 1
        pts = np.stack([np.cos(k * t), np.sin(k * t), (t - np.pi) / np.pi * (k > 1)], 1)
        pts = pts * rng.uniform(0.5, 2.0) + rng.normal(0, 0.02, pts.shape)
        head = (
            "ply\nformat ascii 1.0\n"
            f"element vertex {len(pts)}\nproperty float x\nproperty float y\nproperty float z\n"
            "end_header\n"
        )
        body = "\n".join(" ".join(f"{v:.5f}" for v in p) for p in pts)
        return (head + body + "\n").encode(), ".ply"

    def from_bytes(self, data: bytes, suffix: str | None = None) -> np.ndarray:
        """Reads one point-cloud file (format from ``suffix``) and featurizes it.

        Raises:
            SampleError: ``empty``, ``decode_error``, ``unsupported_format``,
                ``non_finite``, ``too_large``.
        """
        if not data:
            raise SampleError("empty", "zero-byte point cloud")
        suffix = normalize_suffix(suffix, ".ply")
        if suffix not in self.suffixes:
            raise SampleError("unsupported_format", f"point cloud suffix {suffix}")
        o3d = import_open3d()  # lazy: heavy import

        # open3d reads PLY/PCD only from files; a private temp file keeps workers isolated.
        fd, path = tempfile.mkstemp(suffix=suffix)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            try:
                pcd = o3d.io.read_point_cloud(
                    path, format="auto", remove_nan_points=False, remove_infinite_points=False
                )
            except Exception as e:  # noqa: BLE001
                raise SampleError("decode_error", f"{type(e).__name__}: {e}") from e
        finally:
            os.unlink(path)
        pts = np.asarray(pcd.points)
        if len(pts) == 0:
            raise SampleError("decode_error", f"no points could be read from the {suffix} file")
        normals = np.asarray(pcd.normals) if pcd.has_normals() else None
        colors = np.asarray(pcd.colors) if pcd.has_colors() else None
        return self._features(pts, normals, colors)

    def from_array(
        self,
        array: np.ndarray,
        normals: np.ndarray | None = None,
        colors: np.ndarray | None = None,
        **_: Any,
    ) -> np.ndarray:
        """Featurizes points (P, 3), or (P, 6)/(P, 9) with normals/colours appended."""
        a = np.asarray(array)
        if a.dtype.kind not in "uif":
            raise SampleError("bad_dtype", f"point array dtype {a.dtype}")
        if a.ndim != 2 or a.shape[1] not in (3, 6, 9):
            raise SampleError("bad_shape", f"point array shape {a.shape}, want (P, 3|6|9)")
        if a.shape[1] >= 6 and normals is None and self.section.normals:
            normals = a[:, 3:6]
        if a.shape[1] >= 6 and colors is None and self.section.colors:
            colors = a[:, -3:]
        return self._features(a[:, :3].astype(np.float64), normals, colors)

    def _features(
        self, pts: np.ndarray, normals: np.ndarray | None, colors: np.ndarray | None
    ) -> np.ndarray:
        cfg = self.section
        if len(pts) == 0:
            raise SampleError("empty", "no points")
        if len(pts) > cfg.max_points:
            raise SampleError("too_large", f"{len(pts)} points > max_points={cfg.max_points}")
        check_finite(pts, "point coordinates")
        pts = pts - pts.mean(axis=0, keepdims=True)
        radius = float(np.linalg.norm(pts, axis=1).max())
        if radius > 0:
            pts = pts / radius
        if cfg.normals and normals is not None:
            check_finite(np.asarray(normals, float), "point normals")
        if cfg.colors and colors is not None:
            check_finite(np.asarray(colors, float), "point colours")
        return self._sample(pts, normals, colors).astype(np.float16)

    def _sample(
        self, pts: np.ndarray, normals: np.ndarray | None, colors: np.ndarray | None
    ) -> np.ndarray:
        """(P, 3) points (+ attributes) -> (num_points, C): FPS, or tiling when P < N."""
        cfg = self.section
        n = cfg.num_points
        normals = np.zeros_like(pts) if normals is None else np.asarray(normals, np.float64)
        colors = np.zeros_like(pts) if colors is None else np.asarray(colors, np.float64)
        if len(pts) <= n:
            idx = np.resize(np.arange(len(pts)), n)
            pts, normals, colors = pts[idx], normals[idx], colors[idx]
        else:
            o3d = import_open3d()
            # open3d's FPS starts from point 0 (deterministic) and carries normals and
            # colours along with the chosen points.
            pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts))
            pcd.normals = o3d.utility.Vector3dVector(normals)
            pcd.colors = o3d.utility.Vector3dVector(colors)
            down = pcd.farthest_point_down_sample(n)
            pts, normals, colors = (
                np.asarray(down.points),
                np.asarray(down.normals),
                np.asarray(down.colors),
            )
        chans = [pts]
        if cfg.normals:
            chans.append(normals)
        if cfg.colors:
            chans.append(colors)
        return np.concatenate(chans, axis=1)  # (N, C)

    # -- writer (the inverse of featurization) ------------------------------------------
    write_formats = ("ply",)

    def write(self, item: np.ndarray, fmt: str | None = None) -> Written:
        """A featurized (N, C) cloud -> ASCII PLY of its xyz (+ normals/colours when the
        section has them), which open3d, MeshLab or Blender open.

        Raises:
            SampleError: ``unsupported_format``, ``bad_shape``, ``non_finite``.
        """
        if (fmt or "ply") != "ply":
            raise SampleError(
                "unsupported_format", f"point cloud writer formats: {self.write_formats}"
            )
        a = np.asarray(item, dtype=np.float32)
        if a.ndim != 2 or a.shape[1] < 3:
            raise SampleError("bad_shape", f"point item shape {a.shape}, want (N, >=3)")
        check_finite(a, "point coordinates")
        cfg = self.section
        props = ["x", "y", "z"]
        cols = [a[:, :3]]
        if cfg.normals and a.shape[1] >= 6:
            props += ["nx", "ny", "nz"]
            cols.append(a[:, 3:6])
        data = np.concatenate(cols, 1)
        head = f"ply\nformat ascii 1.0\nelement vertex {len(data)}\n" + "".join(
            f"property float {p}\n" for p in props
        )
        if cfg.colors and a.shape[1] >= 6:
            rgb = np.clip(a[:, -3:] * 255.0 + 0.5, 0, 255).astype(np.uint8)
            head += "property uchar red\nproperty uchar green\nproperty uchar blue\n"
            body = "\n".join(
                " ".join(f"{v:.5f}" for v in p) + " " + " ".join(str(int(c)) for c in col)
                for p, col in zip(data, rgb, strict=True)
            )
        else:
            body = "\n".join(" ".join(f"{v:.5f}" for v in p) for p in data)
        return Written((head + "end_header\n" + body + "\n").encode(), "application/x-ply", ".ply")
