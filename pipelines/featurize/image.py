"""Image featurizer: PNG/JPEG/... (PIL) -> uint8 (size, size, 3) RGB.

The shorter side is resized to ``size`` (aspect kept) and the centre is cropped.
Decompression bombs are refused from the header, before pixels are decoded.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines.featurize import register
from pipelines.featurize.base import Featurizer, SampleError, check_finite


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """Resizes the shorter side to ``size`` and centre-crops; returns uint8 (size, size, 3)."""
    img = ImageOps.fit(img, (size, size), method=Image.Resampling.BILINEAR, centering=(0.5, 0.5))
    return np.asarray(img, dtype=np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited onto white (not black garbage)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


@register("image")
class ImageFeaturizer(Featurizer):
    """Images -> uint8 (H, W, 3) with H = W = ``config.image.size``."""

    suffixes = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
    dtype = np.dtype(np.uint8)

    def output_shape(self) -> tuple[int, int, int]:
        s = self.config.image.size
        return (s, s, 3)

    def from_bytes(self, data: bytes, suffix: str | None = None) -> np.ndarray:
        """Decodes and featurizes one image file.

        Raises:
            SampleError: ``empty``, ``decode_error``, ``truncated`` or ``too_large``.
        """
        if not data:
            raise SampleError("empty", "zero-byte image")
        cfg = self.config.image
        with warnings.catch_warnings():
            # PIL warns (not raises) between MAX_IMAGE_PIXELS and 2x; we check ourselves.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                img = Image.open(io.BytesIO(data))
            except Image.DecompressionBombError as e:
                raise SampleError("too_large", str(e)) from e
            except UnidentifiedImageError as e:
                raise SampleError("decode_error", "not a recognised image format") from e
            except Exception as e:  # noqa: BLE001 - any PIL parser failure is a bad file
                raise SampleError("decode_error", f"{type(e).__name__}: {e}") from e
            w, h = img.size
            if w <= 0 or h <= 0:
                raise SampleError("empty", f"image size {w}x{h}")
            if w * h > cfg.max_pixels:
                raise SampleError("too_large", f"{w}x{h} pixels > max_pixels={cfg.max_pixels}")
            if img.format == "JPEG":
                # Let libjpeg decode at a reduced scale: much faster for big photos.
                img.draft("RGB", (cfg.size * 2, cfg.size * 2))
            try:
                img.load()
            except Image.DecompressionBombError as e:
                raise SampleError("too_large", str(e)) from e
            except OSError as e:
                msg = str(e)
                reason = (
                    "truncated" if "truncated" in msg or "broken data" in msg else "decode_error"
                )
                raise SampleError(reason, msg) from e
            except Exception as e:  # noqa: BLE001
                raise SampleError("decode_error", f"{type(e).__name__}: {e}") from e
            return resize_center_crop(to_rgb(img), cfg.size)

    def from_array(self, array: np.ndarray, **_: Any) -> np.ndarray:
        """Featurizes an (H, W), (H, W, 1|3|4) array: uint8, or float in [0, 1].

        Raises:
            SampleError: ``bad_dtype``, ``bad_shape``, ``non_finite``, ``too_large``.
        """
        a = np.asarray(array)
        if a.dtype.kind not in "uif" and a.dtype != np.bool_:
            raise SampleError("bad_dtype", f"image array dtype {a.dtype}")
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
            raise SampleError("bad_shape", f"image array shape {a.shape}")
        if a.size == 0:
            raise SampleError("empty", f"image array shape {a.shape}")
        if a.shape[0] * a.shape[1] > self.config.image.max_pixels:
            raise SampleError("too_large", f"image array shape {a.shape}")
        check_finite(a, "image")
        if a.dtype.kind == "f":
            a = np.clip(a, 0.0, 1.0) * 255.0 + 0.5
        a = np.clip(a, 0, 255).astype(np.uint8)
        # fromarray infers L / RGB / RGBA from the (contiguous uint8) shape.
        img = Image.fromarray(np.ascontiguousarray(a))
        return resize_center_crop(to_rgb(img), self.config.image.size)
