"""Image: a base64 PNG/JPEG (anything PIL opens); pixel limit read from the header."""

from __future__ import annotations

import io

import numpy as np

from serve.config import Limits
from serve.errors import ApiError
from serve.modalities.base import ModalitySpec, RawInput, register


@register
class ImageSpec(ModalitySpec):
    name = "image"

    def sniff_suffix(self, raw: bytes) -> str:
        if raw.startswith(b"\x89PNG"):
            return ".png"
        if raw.startswith(b"\xff\xd8\xff"):
            return ".jpg"
        if raw[:6] in (b"GIF87a", b"GIF89a"):
            return ".gif"
        if raw.startswith(b"BM"):
            return ".bmp"
        if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
            return ".webp"
        return ".png"

    def check_limits(self, item: RawInput, limits: Limits) -> None:
        from PIL import Image

        try:
            # Image.open reads only the header; pixels are decoded later by the featurizer.
            with Image.open(io.BytesIO(item.data)) as im:
                w, h = im.size
        except Image.DecompressionBombError:
            raise ApiError(
                413,
                f"{item.param}: image dimensions are a decompression bomb",
                "too_large",
                item.param,
            ) from None
        except Exception as e:  # noqa: BLE001 - any PIL failure is undecodable input
            raise ApiError(
                400,
                f"{item.param}: not a decodable image ({type(e).__name__})",
                "decode_error",
                item.param,
            ) from None
        if w * h > limits.max_image_pixels:
            raise ApiError(
                413,
                f"{item.param}: {w}x{h} exceeds {limits.max_image_pixels} pixels",
                "too_large",
                item.param,
            )

    def cost(self, arr: np.ndarray) -> int:
        # (H, W, 3) uint8: cost in 32x32 tiles.
        return max(1, int(arr.shape[0] * arr.shape[1]) // 1024)
