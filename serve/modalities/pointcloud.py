"""Point cloud: a base64 PLY/PCD/XYZ file, or inline ``[[x, y, z], ...]`` (or 6/9 columns)."""

from __future__ import annotations

from serve.modalities.base import ModalitySpec, register_spec


@register_spec("pointcloud")
class PointCloudSpec(ModalitySpec):
    pass
