"""Image of the OmniDigits corpus: a real handwritten digit (scikit-learn ``load_digits``),
upscaled to 32/48/64 px and augmented; PNG (some JPEG)."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np

from jobs.demo.corpus.plan import _sklearn_digits

if TYPE_CHECKING:
    from jobs.demo.corpus.plan import RowPlan


def _render_image(row: RowPlan, r: np.random.Generator) -> Any:
    """The row's real handwritten digit, upscaled and augmented. Returns a PIL image."""
    from PIL import Image

    images, _ = _sklearn_digits()
    ink = images[row.image_src] / 16.0  # (8, 8) ink density in [0, 1]
    size = int(r.choice([32, 32, 48, 64]))
    im = Image.fromarray(np.uint8(np.round(ink * 255)))  # mode L
    im = im.resize((size, size), Image.Resampling.BICUBIC)
    im = im.rotate(float(r.uniform(-12, 12)), resample=Image.Resampling.BILINEAR,
                   translate=(int(r.integers(-2, 3)), int(r.integers(-2, 3))))  # fmt: skip
    a = np.asarray(im, dtype=np.float32) / 255.0  # (S, S) ink
    paper = np.array([255, 255, 255], np.float32) - r.uniform(0, 25)  # off-white paper
    ink_rgb = np.asarray(row.writer.ink, np.float32)
    rgb = paper[None, None] * (1 - a[..., None]) + ink_rgb[None, None] * a[..., None]
    rgb += r.normal(0, 255 * row.writer.noise, rgb.shape)
    rgb = np.clip(np.round(rgb), 0, 255).astype(np.uint8)  # (S, S, 3)
    if r.random() < 0.3:  # some scans are greyscale
        return Image.fromarray(rgb).convert("L")
    return Image.fromarray(rgb)


def _image_bytes(im: Any, fmt: str, r: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        im.save(buf, format="JPEG", quality=int(r.integers(75, 96)))
    else:
        im.save(buf, format="PNG")
    return buf.getvalue()


def _ambiguous_image(im: Any, r: np.random.Generator) -> Any:
    """An occluded scan: a paper-coloured patch over 55-70% of each side, at a random spot."""
    from PIL import Image

    a = np.array(im)
    h, w = a.shape[:2]
    ph, pw = int(h * r.uniform(0.55, 0.7)), int(w * r.uniform(0.55, 0.7))
    y, x = int(r.integers(0, h - ph + 1)), int(r.integers(0, w - pw + 1))
    paper = np.median(np.concatenate([a[0], a[-1]]), axis=0)  # border colour
    a[y : y + ph, x : x + pw] = paper
    return Image.fromarray(a.astype(np.uint8))


def _rescan(im: Any, near: np.random.Generator) -> Any:
    """A near duplicate's re-scan: brightness shift and a one-pixel crop."""
    from PIL import Image, ImageEnhance

    im = ImageEnhance.Brightness(im).enhance(float(near.uniform(0.9, 1.1)))
    w, h = im.size
    return im.crop((1, 1, w, h)).resize((w, h), Image.Resampling.BILINEAR)
