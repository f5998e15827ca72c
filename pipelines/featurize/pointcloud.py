"""Point-cloud featurizer: PLY/PCD/XYZ (open3d) -> float16 (N, 3[+3][+3]).

Points are centred on their mean, scaled into the unit sphere and reduced to
``num_points`` by farthest-point sampling (open3d); smaller clouds are tiled. Optional
normals and colours are appended as extra channels.
"""

from __future__ import annotations

import os
import struct
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
from pipelines.featurize.sandbox import can_isolate, run_isolated


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


@dataclass
class CloudClaims:
    """What a point-cloud file's header claims, before any reader runs.

    Attributes:
        points: Points (vertices) claimed.
        fields: Properties per point (PLY: the largest element's; PCD: FIELDS), or elements.
        min_bytes: Bytes the claimed contents need at least (header included).
    """

    points: int = 0
    fields: int = 0
    min_bytes: int = 0


#: Bytes of one value of each PLY / PCD scalar type.
_PLY_SIZES = {
    "char": 1, "uchar": 1, "int8": 1, "uint8": 1, "short": 2, "ushort": 2, "int16": 2,
    "uint16": 2, "int": 4, "uint": 4, "int32": 4, "uint32": 4, "float": 4, "float32": 4,
    "double": 8, "float64": 8,
}  # fmt: skip
_HEADER_LIMIT = 64 * 1024


def _count(token: bytes, what: str) -> int:
    try:
        n = int(token)
    except ValueError:
        raise SampleError("decode_error", f"{what} is not an integer: {token[:40]!r}") from None
    if n < 0:
        raise SampleError("decode_error", f"{what} is negative: {n}")
    return n


def ply_claims(data: bytes) -> CloudClaims:
    """Vertex count, properties and minimum size a PLY header claims (comment and
    ``obj_info`` lines anywhere in the header are skipped, as the format allows)."""
    end = data.find(b"end_header", 0, _HEADER_LIMIT)
    if data.lstrip().startswith(b"ply") and end < 0 and len(data) > _HEADER_LIMIT:
        raise SampleError("too_large", f"no PLY end_header in the first {_HEADER_LIMIT} bytes")
    if not data.lstrip().startswith(b"ply") or end < 0:
        raise SampleError("decode_error", "no PLY header (ply ... end_header)")
    nl = data.find(b"\n", end)
    body = len(data) - (nl + 1 if nl >= 0 else len(data))
    ascii_ = True
    elements: list[list] = []  # [name, count, min bytes per item, properties]
    for raw in data[:end].splitlines()[1:]:
        tok = raw.split()
        if not tok or tok[0] in (b"comment", b"obj_info"):
            continue
        if tok[0] == b"format" and len(tok) >= 2:
            ascii_ = tok[1] == b"ascii"
        elif tok[0] == b"element" and len(tok) >= 3:
            elements.append([tok[1], _count(tok[2], "PLY element count"), 0, 0])
        elif tok[0] == b"property" and elements and len(tok) >= 3:
            el = elements[-1]
            el[3] += 1
            if tok[1] == b"list" and len(tok) >= 5:  # list <count type> <item type> name
                el[2] += 2 if ascii_ else _PLY_SIZES.get(tok[2].decode("latin-1"), 1)
            else:
                el[2] += 2 if ascii_ else _PLY_SIZES.get(tok[1].decode("latin-1"), 1)
    vertex = next((e for e in elements if e[0] == b"vertex"), None)
    return CloudClaims(
        points=vertex[1] if vertex else 0,
        fields=max([len(elements)] + [e[3] for e in elements]),
        min_bytes=len(data) - body + sum(e[1] * e[2] for e in elements),
    )


def pcd_claims(data: bytes) -> CloudClaims:
    """POINTS (and WIDTH x HEIGHT), FIELDS and the data size a PCD header claims."""
    head: dict[bytes, list[bytes]] = {}
    pos = 0
    while pos < min(len(data), _HEADER_LIMIT):
        nl = data.find(b"\n", pos)
        nl = len(data) if nl < 0 else nl
        tok = data[pos:nl].split()
        pos = nl + 1
        if not tok or tok[0].startswith(b"#"):
            continue
        head[tok[0].upper()] = tok[1:]
        if tok[0].upper() == b"DATA":
            break
    if b"DATA" not in head or b"FIELDS" not in head:
        if len(data) > _HEADER_LIMIT:
            raise SampleError("too_large", f"no PCD header in the first {_HEADER_LIMIT} bytes")
        raise SampleError("decode_error", "no PCD header (FIELDS ... DATA)")
    n_fields = len(head[b"FIELDS"])
    sizes = [_count(t, "PCD SIZE") for t in head.get(b"SIZE", [b"4"] * n_fields)]
    counts = [_count(t, "PCD COUNT") for t in head.get(b"COUNT", [b"1"] * n_fields)]
    width = _count((head.get(b"WIDTH") or [b"0"])[0], "PCD WIDTH")
    height = _count((head.get(b"HEIGHT") or [b"1"])[0], "PCD HEIGHT")
    points = _count((head.get(b"POINTS") or [str(width * height).encode()])[0], "PCD POINTS")
    values = sum(counts)
    kind = (head[b"DATA"] or [b"ascii"])[0].lower()
    if kind == b"binary":
        need = points * sum(s * c for s, c in zip(sizes, counts, strict=False))
    elif kind == b"binary_compressed":
        need = 8
        if pos + 8 <= len(data):
            compressed, raw = struct.unpack_from("<II", data, pos)
            if raw != points * sum(s * c for s, c in zip(sizes, counts, strict=False)):
                raise SampleError("decode_error", "PCD compressed size disagrees with POINTS")
            need += compressed
    else:
        need = points * 2 * max(1, values)
    return CloudClaims(
        points=max(points, width * height), fields=max(n_fields, values), min_bytes=pos + need
    )


def off_claims(data: bytes) -> CloudClaims:
    """Vertex count an OFF header claims (``OFF`` [comments] ``nV nF nE``)."""
    counts = _off_counts(data)[0]
    return CloudClaims(points=counts[0], fields=3, min_bytes=counts[0] * 6)


def _off_counts(data: bytes) -> tuple[list[int], int]:
    """(``[nV, nF, nE]``, offset of the first vertex line) of an OFF file."""
    lines = data[:_HEADER_LIMIT].split(b"\n")
    first = lines[0].split()
    if not first or first[0].lstrip(b"\xef\xbb\xbf") not in (b"OFF", b"COFF", b"NOFF"):
        raise SampleError("decode_error", "no OFF header")
    pos = len(lines[0]) + 1
    tokens = first[1:]  # "OFF nV nF nE" on one line is common (ModelNet)
    for line in lines[1:]:
        if len(tokens) >= 3:
            break
        pos += len(line) + 1
        if line.strip().startswith(b"#"):
            continue
        tokens += line.split()
    if len(tokens) < 3:
        raise SampleError("decode_error", "OFF header has no vertex/face counts")
    return [_count(t, "OFF count") for t in tokens[:3]], pos


def read_off(data: bytes, max_points: int) -> np.ndarray:
    """(nV, 3) float64 vertices of an OFF file (its faces are ignored)."""
    (n, _, _), pos = _off_counts(data)
    if n > max_points:
        raise SampleError("too_large", f"OFF claims {n} vertices > max_points={max_points}")
    rows = [r for r in data[pos:].split(b"\n") if r.strip() and not r.lstrip().startswith(b"#")]
    if len(rows) < n:
        raise SampleError("truncated", f"OFF claims {n} vertices, {len(rows)} lines present")
    try:
        pts = np.array([[float(v) for v in r.split()[:3]] for r in rows[:n]], np.float64)
    except ValueError as e:
        raise SampleError("decode_error", f"OFF vertex: {e}") from None
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise SampleError("decode_error", "OFF vertex lines need three coordinates")
    return pts


def text_claims(data: bytes, suffix: str) -> CloudClaims:
    """XYZ-like text (one point per line; ``.pts`` starts with a count line)."""
    lines = data.count(b"\n") + (not data.endswith(b"\n"))
    points = lines
    if suffix == ".pts":
        first = data.split(b"\n", 1)[0].split()
        if len(first) == 1:
            points = max(points, _count(first[0], "PTS point count"))
    return CloudClaims(points=points, fields=3, min_bytes=0)


def _read_open3d(data: bytes, suffix: str) -> dict[str, np.ndarray]:
    """open3d's reader on a private temp file -> points (+ normals, colours)."""
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
    out = {"points": pts}
    if pcd.has_normals():
        out["normals"] = np.asarray(pcd.normals)
    if pcd.has_colors():
        out["colors"] = np.asarray(pcd.colors)
    return out


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
            max_points: Clouds with more points are ``too_large`` (checked from the file
                header before the reader allocates, and again after reading).
            max_fields: Most properties (PLY) / fields (PCD) per point, and elements (PLY).
            isolate: Read files in a sacrificial child process (:mod:`.sandbox`).
            decode_memory_mb: Address space the reading child may add.
            decode_timeout_s: Wall-clock limit of one file's read.
        """

        num_points: int = 256
        normals: bool = False
        colors: bool = False
        max_points: int = 5_000_000
        max_fields: int = 64
        isolate: bool = True
        decode_memory_mb: int = 1024
        decode_timeout_s: float = 30.0

        @property
        def num_channels(self) -> int:
            return 3 + 3 * int(self.normals) + 3 * int(self.colors)

    suffixes = (".ply", ".pcd", ".xyz", ".xyzn", ".xyzrgb", ".pts", ".off")

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
        if head.startswith(b"OFF") or head.startswith(b"COFF") or head.startswith(b"NOFF"):
            return ".off"
        if head.startswith(b"# .PCD") or head.startswith(b"VERSION") or b"FIELDS" in head:
            return ".pcd"
        lines = head.split(b"\n", 2)
        first = lines[0].split()
        try:
            if len(first) >= 3 and all(np.isfinite(float(v)) for v in first):
                return ".xyz"
            # .pts: a point count, then one point per line
            if len(first) == 1 and first[0].isdigit() and len(lines) > 1:
                second = lines[1].split()
                if len(second) >= 3 and all(np.isfinite(float(v)) for v in second[:3]):
                    return ".pts"
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
        self.check_header(data, suffix)
        if suffix == ".off":
            return self._features(read_off(data, self.section.max_points), None, None)
        cfg = self.section
        if cfg.isolate and can_isolate():
            import_open3d()  # once, in this process: the forked child inherits it loaded
            out = run_isolated(
                lambda: _read_open3d(data, suffix),
                memory_mb=cfg.decode_memory_mb,
                timeout_s=cfg.decode_timeout_s,
                what="point-cloud reader",
            )
        else:
            out = _read_open3d(data, suffix)
        if out["points"].shape[0] > cfg.max_points:
            raise SampleError("too_large", f"{len(out['points'])} points > max_points")
        return self._features(out["points"], out.get("normals"), out.get("colors"))

    def check_header(self, data: bytes, suffix: str) -> None:
        """Refuses a file from what its header claims, before any reader allocates: more
        points than ``max_points`` or more fields than ``max_fields`` (``too_large``), more
        than the file has bytes for (``truncated``), or no valid header (``decode_error``)."""
        cfg = self.section
        if suffix == ".ply":
            claims = ply_claims(data)
        elif suffix == ".pcd":
            claims = pcd_claims(data)
        elif suffix == ".off":
            claims = off_claims(data)
        else:  # XYZ-like text: one point per line (.pts: a count line first)
            claims = text_claims(data, suffix)
        if claims.fields > cfg.max_fields:
            raise SampleError(
                "too_large", f"{claims.fields} fields per point > max_fields={cfg.max_fields}"
            )
        if claims.points > cfg.max_points:
            raise SampleError(
                "too_large", f"header claims {claims.points} points > max_points={cfg.max_points}"
            )
        if claims.min_bytes > len(data):
            raise SampleError(
                "truncated",
                f"header claims {claims.points} points needing >= {claims.min_bytes} bytes,"
                f" the file has {len(data)}",
            )

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
