"""Image: a base64 PNG/JPEG/GIF/BMP/WebP file (or an ``(H, W, 3)`` JSON array)."""

from __future__ import annotations

from serve.modalities.base import ModalitySpec, register_spec


@register_spec("image")
class ImageSpec(ModalitySpec):
    pass
