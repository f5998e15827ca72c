"""Image featurizer: PNG/JPEG/... (PIL) -> uint8 (size, size, 3) RGB.

The shorter side is resized to ``size`` (aspect kept) and the centre is cropped.
Decompression bombs are refused from the header, before pixels are decoded.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines.featurize import register
from pipelines.featurize.base import Featurizer, SampleError, Written, check_finite


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
    """Images -> uint8 (H, W, 3) with H = W = ``section.size``."""

    @dataclass
    class Config:
        """Images -> uint8 (size, size, 3): shorter side resized to ``size``, centre crop.

        Attributes:
            size: Output height and width.
            max_pixels: Decoded width*height above this is a decompression bomb
                (``too_large``).
        """

        size: int = 32
        max_pixels: int = 40_000_000

    suffixes = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
    near_dedupe = "phash"

    def output_shape(self) -> tuple[int, int, int]:
        s = self.section.size
        return (s, s, 3)

    @classmethod
    def sniff(cls, data: bytes) -> str | None:
        if data.startswith(b"\x89PNG"):
            return ".png"
        if data.startswith(b"\xff\xd8\xff"):
            return ".jpg"
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return ".gif"
        if data.startswith(b"BM"):
            return ".bmp"
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return ".webp"
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            return ".tif"
        return None

    def example(self, rng: np.random.Generator, label: int = 0) -> tuple[bytes, str]:
        """A PNG (40x48) of one of ten shapes (``label``) in a random colour and place."""
        from PIL import ImageDraw

        h, w = 40, 48
        bg = tuple(int(c) for c in rng.integers(200, 256, 3))
        ink = tuple(int(c) for c in rng.integers(0, 90, 3))
        img = Image.new("RGB", (w, h), bg)
        d = ImageDraw.Draw(img)
        cx, cy = w / 2 + rng.uniform(-4, 4), h / 2 + rng.uniform(-3, 3)
        r = rng.uniform(11, 15)
        k = int(label) % 10
        if k == 0:
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=ink)
        elif k == 1:
            d.rectangle([cx - 2, cy - r, cx + 2, cy + r], fill=ink)
        elif k == 2:
            d.rectangle([cx - r, cy - 2, cx + r, cy + 2], fill=ink)
        elif k == 3:
            d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=ink)
        else:  # regular polygons with 3..8 corners
            n = k if k < 9 else 3
            ang = np.pi / 2 * (k == 9) + np.arange(n) * 2 * np.pi / n
            d.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for a in ang], fill=ink)
        a = np.asarray(img, np.int16) + rng.integers(-6, 7, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, "PNG")
        return buf.getvalue(), ".png"

    def from_bytes(self, data: bytes, suffix: str | None = None) -> np.ndarray:
        """Decodes and featurizes one image file.

        Raises:
            SampleError: ``empty``, ``decode_error``, ``truncated`` or ``too_large``.
        """
        return resize_center_crop(self.decode_image(data), self.section.size)

    def decode_image(self, data: bytes) -> Image.Image:
        """One image file -> a loaded RGB PIL image, its limits checked (also the decode step
        of the pretrained-tower featurizer, whose processor does the resizing).

        Raises:
            SampleError: ``empty``, ``decode_error``, ``truncated`` or ``too_large``.
        """
        if not data:
            raise SampleError("empty", "zero-byte image")
        cfg = self.section
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
            return to_rgb(img)

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
        if a.shape[0] * a.shape[1] > self.section.max_pixels:
            raise SampleError("too_large", f"image array shape {a.shape}")
        check_finite(a, "image")
        if a.dtype.kind == "f":
            a = np.clip(a, 0.0, 1.0) * 255.0 + 0.5
        a = np.clip(a, 0, 255).astype(np.uint8)
        # fromarray infers L / RGB / RGBA from the (contiguous uint8) shape.
        img = Image.fromarray(np.ascontiguousarray(a))
        return resize_center_crop(to_rgb(img), self.section.size)

    # -- writer (the inverse of featurization) ------------------------------------------
    write_formats = ("png",)

    def write(self, item: np.ndarray, fmt: str | None = None) -> Written:
        """A featurized uint8 (H, W, 3) image -> PNG bytes.

        Raises:
            SampleError: ``unsupported_format`` (``fmt`` not ``png``), ``bad_shape``.
        """
        if (fmt or "png") != "png":
            raise SampleError("unsupported_format", f"image writer formats: {self.write_formats}")
        a = np.asarray(item)
        if a.ndim != 3 or a.shape[-1] != 3:
            raise SampleError("bad_shape", f"image item shape {a.shape}, want (H, W, 3)")
        buf = io.BytesIO()
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB").save(buf, "PNG")
        return Written(buf.getvalue(), "image/png", ".png")
