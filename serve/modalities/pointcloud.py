"""Point cloud: a base64 PLY/PCD/XYZ file, or inline ``[[x, y, z], ...]`` (or 6 columns)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from serve.config import Limits
from serve.errors import ApiError
from serve.modalities.base import ModalitySpec, RawInput, numeric_array, register

_PLY_VERTEX = re.compile(rb"element\s+vertex\s+(\d+)")
_PCD_POINTS = re.compile(rb"^POINTS\s+(\d+)", re.MULTILINE)


@register
class PointCloudSpec(ModalitySpec):
    name = "pointcloud"

    def parse(self, value: Any, limits: Limits, param: str) -> RawInput:
        if isinstance(value, list):
            arr = numeric_array(value, param, ndim=2, max_elems=limits.max_points * 6)
            if arr.shape[1] not in (3, 6):
                raise ApiError(
                    422,
                    f"{param}: points need 3 (xyz) or 6 columns, got {arr.shape[1]}",
                    "wrong_shape",
                    param,
                )
            if arr.shape[0] > limits.max_points:
                raise ApiError(
                    413,
                    f"{param}: {arr.shape[0]} points exceed {limits.max_points}",
                    "too_large",
                    param,
                )
            return RawInput(self.name, "array", arr, "", param)
        return super().parse(value, limits, param)

    def sniff_suffix(self, raw: bytes) -> str:
        head = raw[:256].lstrip()
        if head.startswith(b"ply"):
            return ".ply"
        if head.startswith(b"#") or head.startswith(b"VERSION") or b"FIELDS" in head:
            return ".pcd"
        return ".xyz"

    def check_limits(self, item: RawInput, limits: Limits) -> None:
        if item.kind != "bytes":
            return
        head = item.data[:4096]
        if item.suffix == ".ply":
            m = _PLY_VERTEX.search(head)
            n = int(m.group(1)) if m else None
        elif item.suffix == ".pcd":
            m = _PCD_POINTS.search(head)
            n = int(m.group(1)) if m else None
        else:
            n = item.data.count(b"\n") + 1
        if n is None:
            raise ApiError(
                400,
                f"{item.param}: point cloud header has no point count",
                "decode_error",
                item.param,
            )
        if n > limits.max_points:
            raise ApiError(
                413, f"{item.param}: {n} points exceed {limits.max_points}", "too_large", item.param
            )

    def cost(self, arr: np.ndarray) -> int:
        # (N, C) points.
        return max(1, int(arr.shape[0]))
