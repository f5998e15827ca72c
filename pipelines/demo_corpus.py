"""OmniDigits: a small, realistic omni-modal demo corpus (ten concepts, the digits 0-9).

Every row is one digit in up to six modalities (Contract 1 of DESIGN.md):

* ``text``: inline phrasing ("the digit 7", "a handwritten seven", "sieben", ...).
* ``image``: a *real* handwritten digit from scikit-learn's ``load_digits`` (8x8, 16 grey
  levels), upscaled to 32/48/64 px, augmented, PNG (some JPEG).
* ``audio``: the digit's name spoken by ``espeak-ng`` with the writer's voice; mostly 16/22.05
  kHz mono WAV, some FLAC and stereo.
* ``video``: the digit drawn stroke by stroke, or the handwritten glyph moving across the
  frame; 12-20 frames, 64x64, H.264 MP4 (``ffmpeg`` CLI, bit-exact flags).
* ``pointcloud``: the digit glyph as a 3D text mesh (open3d), area-sampled to 1024-2048 points,
  rotated/scaled/jittered, PLY (some PCD/XYZ).
* ``signal``: a noisy pen trajectory of the digit: ``.npy`` float32 of shape ``(3, L)``
  (channels ``x, y, pen_down``; ``L`` in 100-300), some CSV with header ``x,y,pen`` and one
  time step per line (shape ``(L, 3)`` as read).

Realism for the downstream pipeline: modalities are dropped per row (every row keeps at least
one); ``group`` is the writer (who also owns the voice and pen style) so group splits do not
leak; a configurable fraction of files is deliberately corrupt and some rows are exact or near
duplicates of others under new ids. Both are listed in ``corpus_info.json``.

Realism for the model: a fraction (``hard_frac``) of each modality's instances is *ambiguous*
on its own, as real data is (a caption that never names the digit, an occluded scan, speech
under loud noise, a blurred clip, a partial scan, an interrupted pen trace). Each is decided
per row and modality independently, so another modality of the row usually still shows the
digit: what fusing modalities can recover and a single modality cannot. They are valid files
(nothing to quarantine) and are listed in ``corpus_info.json`` under ``ambiguous``.

Determinism: all rows are *planned* in the parent process from RNGs derived from
``(seed, row)``; workers render planned rows with their own per-row RNGs, so the output does
not depend on the worker count. Files are byte-identical across builds with the same seed
(ffmpeg runs single-threaded with ``+bitexact``; espeak-ng is deterministic).

Usage::

    python -m pipelines.demo_corpus --out data/omnidigits --n 2000 --seed 0 --workers 2

    from pipelines.demo_corpus import build_corpus
    manifest = build_corpus("data/omnidigits", n=2000, seed=0, workers=2)
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DIGIT_NAMES",
    "FILE_MODALITIES",
    "MODALITIES",
    "CorpusError",
    "build_corpus",
    "file_digest",
    "main",
]

MODALITIES: tuple[str, ...] = ("text", "image", "audio", "video", "pointcloud", "signal")
#: Modalities stored as files (text is inline in the manifest).
FILE_MODALITIES: tuple[str, ...] = ("image", "audio", "video", "pointcloud", "signal")
#: Sub-folder of the corpus root per file modality.
SUBDIRS: dict[str, str] = {
    "image": "images",
    "audio": "audio",
    "video": "video",
    "pointcloud": "points",
    "signal": "signals",
}
CORPUS_VERSION = "omnidigits-2"

DIGIT_NAMES: dict[str, tuple[str, ...]] = {
    "en": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    "de": ("null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun"),
    "fr": ("zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf"),
    "es": ("cero", "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve"),
    "it": ("zero", "uno", "due", "tre", "quattro", "cinque", "sei", "sette", "otto", "nove"),
}
_EN_TEMPLATES: tuple[str, ...] = (
    "{name}",
    "{d}",
    "the digit {d}",
    "the digit {name}",
    "a handwritten {name}",
    "number {name}",
    "the number {d}",
    "a {name}",
    "digit {d}",
    "someone wrote a {name}",
    "{Name}.",
    "it is a {name}",
    "a hand-drawn {d}",
    "the numeral {name}",
)
_FOREIGN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "de": ("{name}", "die Ziffer {name}", "eine handgeschriebene {name}", "Zahl {d}"),
    "fr": ("{name}", "le chiffre {name}", "un {name} écrit à la main", "le nombre {d}"),
    "es": ("{name}", "el dígito {name}", "un {name} escrito a mano", "número {d}"),
    "it": ("{name}", "la cifra {name}", "un {name} scritto a mano", "numero {d}"),
}
_EN_VOICES: tuple[str, ...] = ("en", "en-us", "en-gb-scotland", "en-029", "en-gb-x-rp")
_VARIANTS: tuple[str, ...] = (
    "", "+f1", "+f2", "+f3", "+f4", "+m1", "+m2", "+m3", "+m4", "+m5", "+klatt", "+croak",
)  # fmt: skip
_INKS: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (20, 30, 120), (10, 60, 20), (90, 10, 10))

#: Corruption kinds, per file modality. Each produces a file the pipeline must quarantine.
CORRUPT_KINDS: dict[str, tuple[str, ...]] = {
    "image": ("truncated", "garbage"),
    "audio": ("empty", "garbage"),
    "video": ("truncated", "empty"),
    "pointcloud": ("empty", "non_finite"),
    "signal": ("non_finite", "pickle", "truncated"),
}


class CorpusError(ValueError):
    """Bad build arguments, or an output folder that cannot be used."""


# --------------------------------------------------------------------------- plan


@dataclass
class Writer:
    """A person: owns a voice (audio), a pen style (signal/video) and an image style."""

    wid: int
    lang: str  # language of the voice and of the spoken word
    voice: str  # espeak-ng voice, e.g. "en-us+f3"
    speed: int  # espeak-ng -s (words per minute)
    pitch: int  # espeak-ng -p (0-99)
    slant: float  # pen shear (x += slant * (y - 0.5))
    pen_speed: float  # mean steps per unit of trajectory length
    ink: tuple[int, int, int]
    noise: float  # pen / image noise level


@dataclass
class RowPlan:
    """Everything needed to render one row; built in the parent process."""

    index: int
    id: str
    label: int
    group: str
    writer: Writer
    text: str | None
    #: file modality -> extension (e.g. "png"); absent modalities are not keys.
    formats: dict[str, str]
    image_src: int  # index into sklearn's load_digits
    video_style: str  # "draw" | "move"
    #: row whose content this row repeats (duplicates), else None.
    dup_of: int | None = None
    dup_kind: str | None = None  # "exact" | "near"
    #: file modality -> corruption kind.
    corrupt: dict[str, str] = field(default_factory=dict)
    #: modalities whose content is ambiguous on its own (see the module docstring).
    ambiguous: list[str] = field(default_factory=list)

    def path(self, modality: str) -> str:
        return f"{SUBDIRS[modality]}/{self.index:06d}.{self.formats[modality]}"


def _rng(seed: int, *tags: int) -> np.random.Generator:
    # A SeedSequence over (seed, tags) gives independent streams per purpose and per row,
    # so row i's content never depends on how rows are split between workers.
    return np.random.default_rng(np.random.SeedSequence([seed, *tags]))


_TAG_PLAN, _TAG_RENDER, _TAG_WRITER, _TAG_GLOBAL, _TAG_NEAR = 0, 1, 2, 3, 4
# Own streams for ambiguity, so every other byte of a row is the same with any hard_frac.
_TAG_AMBIG_PLAN, _TAG_AMBIG_RENDER = 5, 6

#: Captions that never name the digit (ambiguous text).
_VAGUE_TEXT: tuple[str, ...] = (
    "a handwritten number",
    "a digit",
    "some number written in pen",
    "a number on a card",
    "the number I wrote down",
    "a single digit",
)


def _make_writer(seed: int, wid: int) -> Writer:
    r = _rng(seed, _TAG_WRITER, wid)
    if r.random() < 0.12:  # a minority of speakers say the digits in their own language
        lang = str(r.choice(["de", "fr", "es", "it"]))
        base = lang
    else:
        lang = "en"
        base = str(r.choice(_EN_VOICES))
    return Writer(
        wid=wid,
        lang=lang,
        voice=base + str(r.choice(_VARIANTS)),
        speed=int(r.integers(120, 201)),
        pitch=int(r.integers(25, 76)),
        slant=float(r.uniform(-0.25, 0.25)),
        pen_speed=float(r.uniform(0.7, 1.4)),
        ink=_INKS[int(r.integers(len(_INKS)))],
        noise=float(r.uniform(0.002, 0.012)),
    )


def _make_text(r: np.random.Generator, label: int) -> str:
    if r.random() < 0.15:
        lang = str(r.choice(list(_FOREIGN_TEMPLATES)))
        tpl = str(r.choice(_FOREIGN_TEMPLATES[lang]))
    else:
        lang = "en"
        tpl = str(r.choice(_EN_TEMPLATES))
    name = DIGIT_NAMES[lang][label]
    return tpl.format(name=name, Name=name.capitalize(), d=label)


def _near_text(r: np.random.Generator, text: str) -> str:
    """A near duplicate of a caption: same words, different surface form."""
    options = [text.upper(), text.capitalize() + ".", f" {text}  ", text + "!", text.title()]
    options = [o for o in options if o != text] or [text + "."]
    return options[int(r.integers(len(options)))]


def _pick(r: np.random.Generator, choices: dict[str, float]) -> str:
    keys = list(choices)
    p = np.asarray([choices[k] for k in keys], dtype=np.float64)
    return keys[int(r.choice(len(keys), p=p / p.sum()))]


def _plan_rows(
    n: int,
    seed: int,
    modality_drop: float,
    corrupt_frac: float,
    dup_frac: float,
    hard_frac: float = 0.0,
) -> list[RowPlan]:
    digits_y = _sklearn_digits()[1]
    n_writers = max(3, n // 10)
    writers = [_make_writer(seed, w) for w in range(n_writers)]
    g = _rng(seed, _TAG_GLOBAL)
    # Each digit's real images in a seed-specific order; rows that show the image take the
    # next unused one, so different rows use different source images. Once a digit's ~180
    # images are used up, a row reuses one its own writer already used (same group, so no
    # train/test leakage), else one of another writer's.
    pools = {d: g.permutation(np.flatnonzero(digits_y == d)) for d in range(10)}
    used = dict.fromkeys(range(10), 0)
    by_writer: dict[tuple[int, int], list[int]] = {}

    rows: list[RowPlan] = []
    for i in range(n):
        r = _rng(seed, _TAG_PLAN, i)
        label = int(r.integers(10))
        writer = writers[int(r.integers(n_writers))]
        present = [m for m in MODALITIES if r.random() >= modality_drop]
        if not present:  # every row keeps at least one modality
            present = [MODALITIES[int(r.integers(len(MODALITIES)))]]
        text = _make_text(r, label)
        formats = {
            "image": _pick(r, {"png": 0.8, "jpg": 0.2}),
            "audio": _pick(r, {"wav": 0.9, "flac": 0.1}),
            "video": "mp4",
            "pointcloud": _pick(r, {"ply": 0.75, "pcd": 0.15, "xyz": 0.1}),
            "signal": _pick(r, {"npy": 0.8, "csv": 0.2}),
        }
        video_style = "draw" if r.random() < 0.6 else "move"
        pool, mine = pools[label], by_writer.setdefault((writer.wid, label), [])
        shown = "image" in present or ("video" in present and video_style == "move")
        if not shown:
            src = int(pool[int(r.integers(len(pool)))])  # never displayed; keeps plans valid
        elif used[label] < len(pool):
            src = int(pool[used[label]])
            used[label] += 1
            mine.append(src)
        elif mine:
            src = mine[int(r.integers(len(mine)))]
        else:
            src = int(pool[used[label] % len(pool)])
            used[label] += 1
        rows.append(
            RowPlan(
                index=i,
                id=f"d-{i:06d}",
                label=label,
                group=f"writer-{writer.wid:03d}",
                writer=writer,
                text=text if "text" in present else None,
                formats={m: formats[m] for m in FILE_MODALITIES if m in present},
                image_src=src,
                video_style=video_style,
            )
        )
        ra = _rng(seed, _TAG_AMBIG_PLAN, i)
        draws = {m: ra.random() for m in MODALITIES}  # every modality draws: order-stable
        rows[-1].ambiguous = [m for m in MODALITIES if m in present and draws[m] < hard_frac]
        if "text" in rows[-1].ambiguous:
            rows[-1].text = _VAGUE_TEXT[int(ra.integers(len(_VAGUE_TEXT)))]

    # Duplicates: a later row repeats an earlier original row (same writer, so same group),
    # exactly (byte-identical files, same text) or nearly (perturbed image, restyled text).
    n_dup = _count(dup_frac, n) if n >= 2 else 0
    dup_rows = sorted(int(x) for x in g.choice(np.arange(1, n), size=n_dup, replace=False))
    dup_set = set(dup_rows)
    for i in dup_rows:
        candidates = [j for j in range(i) if j not in dup_set]
        j = int(candidates[int(g.integers(len(candidates)))])
        src, row = rows[j], rows[i]
        kind = "exact" if g.random() < 0.5 else "near"
        row.label, row.writer, row.group = src.label, src.writer, src.group
        row.formats = dict(src.formats)
        row.image_src, row.video_style = src.image_src, src.video_style
        row.text = src.text
        row.ambiguous = list(src.ambiguous)
        if kind == "near" and src.text is not None:
            row.text = _near_text(_rng(seed, _TAG_NEAR, i), src.text)
        row.dup_of, row.dup_kind = j, kind

    # Corruption: a fraction of all files, spread over modalities; never in a duplicate or
    # in a row that is a duplicate's source, so dedupe and quarantine cases stay separate.
    dup_sources = {r.dup_of for r in rows if r.dup_of is not None}
    slots = [
        (r.index, m)
        for r in rows
        if r.index not in dup_set and r.index not in dup_sources
        for m in r.formats
    ]
    n_corrupt = min(_count(corrupt_frac, len(slots)), len(slots))
    if n_corrupt:
        chosen = sorted(int(k) for k in g.choice(len(slots), size=n_corrupt, replace=False))
        for k in chosen:
            i, m = slots[k]
            kinds = CORRUPT_KINDS[m]
            if rows[i].formats[m] == "csv":  # a text file cannot hold a pickled array
                kinds = tuple(k for k in kinds if k != "pickle")
            rows[i].corrupt[m] = kinds[int(g.integers(len(kinds)))]
    return rows


def _count(frac: float, total: int) -> int:
    """round(frac * total), but at least 1 when frac > 0 so small corpora get some."""
    if frac <= 0 or total <= 0:
        return 0
    return max(1, int(round(frac * total)))


# --------------------------------------------------------------------------- glyphs


@lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) float in [0, 16], labels (1797,) int)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def _arc(
    cx: float, cy: float, rx: float, ry: float, a0: float, a1: float, k: int = 24
) -> list[tuple[float, float]]:
    """Points on an ellipse arc; angles in degrees, 0 = right, 90 = down (image coords)."""
    t = np.radians(np.linspace(a0, a1, k))
    return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in t]


def _strokes(d: int) -> list[list[tuple[float, float]]]:
    """Hand-designed pen strokes per digit in the unit square (x right, y down)."""
    if d == 0:
        return [_arc(0.5, 0.5, 0.3, 0.42, -90, 270, 40)]
    if d == 1:
        return [[(0.32, 0.28), (0.55, 0.08), (0.55, 0.92)]]
    if d == 2:
        return [_arc(0.5, 0.32, 0.28, 0.22, 200, 380, 20) + [(0.2, 0.9), (0.82, 0.9)]]
    if d == 3:
        return [_arc(0.48, 0.3, 0.27, 0.2, 210, 450, 22) + _arc(0.48, 0.7, 0.3, 0.22, -90, 150, 22)]
    if d == 4:
        return [[(0.62, 0.08), (0.15, 0.64), (0.86, 0.64)], [(0.66, 0.32), (0.66, 0.94)]]
    if d == 5:
        return [
            [(0.78, 0.1), (0.3, 0.1), (0.26, 0.46)] + _arc(0.5, 0.66, 0.3, 0.25, 230, 500, 26),
        ]
    if d == 6:
        return [[(0.7, 0.08)] + _arc(0.68, 0.62, 0.45, 0.54, 240, 180, 8)[1:]
                + _arc(0.5, 0.68, 0.27, 0.23, 180, 540, 30)]  # fmt: skip
    if d == 7:
        return [[(0.18, 0.1), (0.82, 0.1), (0.4, 0.92)], [(0.35, 0.52), (0.72, 0.52)]]
    if d == 8:
        return [_arc(0.5, 0.28, 0.22, 0.2, 90, 450, 30) + _arc(0.5, 0.7, 0.28, 0.22, -90, 270, 34)]
    if d == 9:
        return [_arc(0.48, 0.32, 0.25, 0.22, 0, 360, 30) + [(0.73, 0.32), (0.68, 0.92)]]
    raise ValueError(f"not a digit: {d}")


def _trajectory(d: int, writer: Writer, r: np.random.Generator) -> np.ndarray:
    """A pen trajectory of digit ``d``.

    Returns:
        float32 array (L, 3): columns x, y in [0, 1] (y down) and pen_down in {0, 1};
        L in [100, 300] depending on the writer's speed and the row.
    """
    shear = writer.slant + r.normal(0, 0.05)
    sx, sy = r.uniform(0.85, 1.1), r.uniform(0.85, 1.1)
    strokes = []
    for s in _strokes(d):
        p = np.asarray(s, dtype=np.float64)
        p = p + r.normal(0, 0.012, p.shape)  # the hand never repeats a stroke exactly
        p[:, 0] = 0.5 + sx * (p[:, 0] - 0.5) + shear * (0.5 - p[:, 1])
        p[:, 1] = 0.5 + sy * (p[:, 1] - 0.5)
        strokes.append(p)
    lengths = [float(np.sum(np.linalg.norm(np.diff(p, axis=0), axis=1))) for p in strokes]
    total = int(np.clip(round(sum(lengths) * 90 * writer.pen_speed * r.uniform(0.8, 1.25)),
                        100, 300))  # fmt: skip
    n_up = 6  # pen-up steps between strokes
    budget = total - n_up * (len(strokes) - 1)
    alloc = [max(10, int(budget * ln / sum(lengths))) for ln in lengths]
    alloc[-1] = max(10, budget - sum(alloc[:-1]))
    parts: list[np.ndarray] = []
    for p, steps in zip(strokes, alloc, strict=True):
        cum = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(p, axis=0), axis=1))])
        # Non-uniform speed: slower at the ends of a stroke than in the middle.
        u = np.linspace(0.0, 1.0, steps)
        a = r.uniform(0.3, 0.8)
        u = a * (0.5 - 0.5 * np.cos(np.pi * u)) + (1 - a) * u
        xy = np.stack([np.interp(u * cum[-1], cum, p[:, i]) for i in range(2)], axis=1)
        if parts:  # pen up: move from the previous stroke's end to this stroke's start
            s0, s1 = parts[-1][-1, :2], xy[0]
            t = np.linspace(0, 1, n_up + 2)[1:-1, None]
            parts.append(np.concatenate([s0 + t * (s1 - s0), np.zeros((n_up, 1))], axis=1))
        parts.append(np.concatenate([xy, np.ones((steps, 1))], axis=1))
    traj = np.concatenate(parts, axis=0)
    traj[:, :2] += r.normal(0, writer.noise, (len(traj), 2))
    return traj.astype(np.float32)


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


# --------------------------------------------------------------------------- renderers


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


def _render_audio(row: RowPlan, r: np.random.Generator) -> tuple[np.ndarray, int]:
    """The digit's name spoken by the writer's espeak-ng voice.

    Returns:
        (samples, rate): int16 samples (N,) mono or (N, 2) stereo; rate 16000 or 22050.
    """
    import soundfile as sf
    from scipy.signal import resample_poly

    w = row.writer
    word = DIGIT_NAMES[w.lang][row.label]
    cmd = [
        "espeak-ng", "-v", w.voice,
        "-s", str(int(np.clip(w.speed + r.integers(-15, 16), 80, 260))),
        "-p", str(int(np.clip(w.pitch + r.integers(-8, 9), 0, 99))),
        "--stdout", word,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, check=False, timeout=60)
    if proc.returncode != 0 or not proc.stdout:
        raise RuntimeError(f"espeak-ng failed for {cmd}: {proc.stderr.decode(errors='replace')}")
    x, rate = sf.read(io.BytesIO(proc.stdout), dtype="float32")  # (N,) at 22050 Hz
    # Recordings start after a little silence and carry some room noise.
    lead = np.zeros(int(r.integers(0, rate // 5)), np.float32)
    x = np.concatenate([lead, x, np.zeros(int(r.integers(0, rate // 10)), np.float32)])
    x = x * r.uniform(0.5, 1.0) + r.normal(0, 0.002, x.shape).astype(np.float32)
    if r.random() < 0.45:
        x = resample_poly(x, 320, 441).astype(np.float32)  # 22050 -> 16000 Hz
        rate = 16000
    if r.random() < 0.1:  # stereo: the second microphone a bit quieter
        x = np.stack([x, x * r.uniform(0.6, 0.95)], axis=1)
    return np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16), rate


def _audio_bytes(x: np.ndarray, rate: int, fmt: str) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, x, rate, format="FLAC" if fmt == "flac" else "WAV", subtype="PCM_16")
    return buf.getvalue()


def _render_video(row: RowPlan, r: np.random.Generator) -> tuple[np.ndarray, int]:
    """Frames of the digit being drawn (or moving). Returns (uint8 (F, 64, 64, 3), fps)."""
    from PIL import Image, ImageDraw

    n_frames, size = int(r.integers(12, 21)), 64
    bg = np.array([245, 245, 240]) - r.integers(0, 30, 3)
    frames = np.empty((n_frames, size, size, 3), np.uint8)
    if row.video_style == "draw":
        traj = _trajectory(row.label, row.writer, r)  # (L, 3)
        pts = 8 + traj[:, :2] * (size - 16)
        width = int(r.integers(2, 5))
        for f in range(n_frames):
            im = Image.new("RGB", (size, size), tuple(int(c) for c in bg))
            draw = ImageDraw.Draw(im)
            upto = int(round(len(traj) * (f + 1) / n_frames))
            for k in range(1, upto):
                if traj[k, 2] > 0.5 and traj[k - 1, 2] > 0.5:
                    draw.line([tuple(pts[k - 1]), tuple(pts[k])], fill=row.writer.ink, width=width)
            frames[f] = np.asarray(im)
    else:
        images, _ = _sklearn_digits()
        glyph = Image.fromarray(np.uint8(np.round(images[row.image_src] / 16.0 * 255)))
        gs = int(r.integers(24, 37))
        a = np.asarray(glyph.resize((gs, gs), Image.Resampling.BICUBIC), np.float32) / 255.0
        start, end = r.uniform(0, size - gs, 2), r.uniform(0, size - gs, 2)
        ink = np.asarray(row.writer.ink, np.float32)
        for f in range(n_frames):
            canvas = np.tile(bg.astype(np.float32), (size, size, 1))
            x0, y0 = np.round(start + (end - start) * f / max(1, n_frames - 1)).astype(int)
            patch = canvas[y0 : y0 + gs, x0 : x0 + gs]
            canvas[y0 : y0 + gs, x0 : x0 + gs] = patch * (1 - a[..., None]) + ink * a[..., None]
            frames[f] = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    return frames, int(r.choice([8, 10, 12]))


#: Videos encoded per ffmpeg process: its start-up (~50 ms, far more on a loaded machine)
#: costs more than encoding a 64x64 clip, so a chunk's clips share one process.
_FFMPEG_BATCH = 24


def _encode_mp4_batch(jobs: list[tuple[np.ndarray, int, Path]]) -> None:
    """Encodes clips to H.264/yuv420p MP4 with the ffmpeg CLI, several per process.

    Each output is its own single-threaded, bit-exact libx264 encode, so a file's bytes do
    not depend on which other clips share the process (checked by the determinism test).

    Args:
        jobs: (frames uint8 (F, H, W, 3), fps, output path) per clip.
    """
    import tempfile

    for start in range(0, len(jobs), _FFMPEG_BATCH):
        batch = jobs[start : start + _FFMPEG_BATCH]
        with tempfile.TemporaryDirectory(prefix="omnidigits_ff_") as tmp:
            ins: list[str] = []
            outs: list[str] = []
            for k, (frames, fps, path) in enumerate(batch):
                _, h, w, _ = frames.shape
                raw = Path(tmp) / f"{k}.rgb"
                raw.write_bytes(np.ascontiguousarray(frames, dtype=np.uint8).tobytes())
                ins += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
                        "-r", str(fps), "-i", str(raw)]  # fmt: skip
                outs += [
                    "-map", f"{k}:v", "-c:v", "libx264", "-preset", "veryfast",
                    "-pix_fmt", "yuv420p", "-threads", "1", "-fflags", "+bitexact",
                    "-flags:v", "+bitexact", "-map_metadata", "-1", str(path),
                ]  # fmt: skip
            cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *ins, *outs]
            proc = subprocess.run(cmd, capture_output=True, timeout=600)
            if proc.returncode != 0:
                names = ", ".join(str(j[2]) for j in batch)
                raise RuntimeError(
                    f"ffmpeg failed for {names}: {proc.stderr.decode(errors='replace')}"
                )


def _encode_mp4(frames: np.ndarray, fps: int, path: Path) -> None:
    """One clip to MP4 (see :func:`_encode_mp4_batch`)."""
    _encode_mp4_batch([(frames, fps, path)])


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


def _signal_bytes(traj: np.ndarray, fmt: str) -> bytes:
    """npy: float32 (3, L) channels-first; csv: header x,y,pen and L lines."""
    if fmt == "csv":
        lines = ["x,y,pen"] + [f"{x:.5f},{y:.5f},{int(p)}" for x, y, p in traj]
        return ("\n".join(lines) + "\n").encode()
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(traj.T, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


# --------------------------------------------------------------------------- ambiguity


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


def _ambiguous_audio(x: np.ndarray, r: np.random.Generator) -> np.ndarray:
    """Speech under loud noise (SNR about -6 dB)."""
    f = x.astype(np.float32)
    rms = float(np.sqrt(np.mean(f**2))) or 1.0
    f = f + r.normal(0, 2.0 * rms, f.shape).astype(np.float32)
    return np.clip(np.round(f), -32768, 32767).astype(np.int16)


def _ambiguous_video(frames: np.ndarray, r: np.random.Generator) -> np.ndarray:
    """An out-of-focus, noisy clip: each frame reduced to 6x6 and back, plus noise."""
    from PIL import Image

    out = np.empty_like(frames)
    size = frames.shape[1:3][::-1]
    for k, fr in enumerate(frames):
        im = Image.fromarray(fr).resize((6, 6), Image.Resampling.BILINEAR)
        blur = np.asarray(im.resize(size, Image.Resampling.BILINEAR), np.float32)
        out[k] = np.clip(np.round(blur + r.normal(0, 25, blur.shape)), 0, 255).astype(np.uint8)
    return out


def _ambiguous_points(p: np.ndarray, r: np.random.Generator) -> np.ndarray:
    """A partial scan: only the points on one side of a random plane (about a third)."""
    d = r.normal(size=3)
    d /= np.linalg.norm(d)
    proj = p @ d
    return p[proj <= np.quantile(proj, r.uniform(0.25, 0.4))]


def _ambiguous_trajectory(traj: np.ndarray, r: np.random.Generator) -> np.ndarray:
    """An interrupted pen trace: its first 20-35%, with a shaky hand."""
    keep = max(8, int(len(traj) * r.uniform(0.2, 0.35)))
    t = traj[:keep].copy()
    t[:, :2] += r.normal(0, 0.03, (keep, 2)).astype(np.float32)
    return t


# --------------------------------------------------------------------------- corruption


def _corrupt_bytes(modality: str, kind: str, good: bytes, r: np.random.Generator) -> bytes:
    """A broken version of a file, of the given kind (see CORRUPT_KINDS)."""
    if kind == "empty":
        return b""
    if kind == "truncated" and modality == "signal" and not good.startswith(b"\x93NUMPY"):
        # CSV: cut mid-line so the last record misses fields (a clean cut would still parse).
        cut = good[: max(16, int(len(good) * r.uniform(0.2, 0.5)))]
        return cut[: cut.rindex(b",") + 1]
    if kind == "truncated":
        return good[: max(8, int(len(good) * r.uniform(0.2, 0.5)))]
    if kind == "garbage":
        return r.integers(0, 256, int(r.integers(64, 2048)), dtype=np.uint8).tobytes()
    if kind == "non_finite" and modality == "signal":
        buf = io.BytesIO()
        x = np.load(io.BytesIO(good), allow_pickle=False) if good[:6] == b"\x93NUMPY" else None
        if x is None:  # csv: write NaNs into the text
            lines = good.decode().splitlines()
            k = 1 + int(r.integers(len(lines) - 1))
            lines[k] = "nan,inf,1"
            return ("\n".join(lines) + "\n").encode()
        x = x.copy()
        x[:, int(r.integers(x.shape[1]))] = np.nan
        np.save(buf, x, allow_pickle=False)
        return buf.getvalue()
    if kind == "pickle":  # an object array: only loadable by unpickling, which is refused
        buf = io.BytesIO()
        np.save(buf, np.array([{"x": [1.0, 2.0]}, None], dtype=object), allow_pickle=True)
        return buf.getvalue()
    raise ValueError(f"unknown corruption {modality}/{kind}")


# --------------------------------------------------------------------------- workers


def _render_row(
    row: RowPlan, root: Path, seed: int, videos: list[tuple[np.ndarray, int, Path]]
) -> dict[str, int]:
    """Writes the files of one row, except its video clip, which is appended to ``videos``
    for batched encoding. Returns file modality -> size in bytes (video not included)."""
    # A duplicate renders its source row's content (same RNG stream) under its own paths.
    src_index = row.dup_of if row.dup_of is not None else row.index
    r = _rng(seed, _TAG_RENDER, src_index)
    near = _rng(seed, _TAG_NEAR, row.index) if row.dup_kind == "near" else None
    sizes: dict[str, int] = {}
    # Always draw every modality's randomness in a fixed order so a row's content for one
    # modality does not depend on which other modalities were dropped.
    subs = {m: np.random.default_rng(r.integers(2**63)) for m in FILE_MODALITIES}
    for m in FILE_MODALITIES:
        if m not in row.formats:
            continue
        rm = subs[m]
        amb = (
            _rng(seed, _TAG_AMBIG_RENDER, src_index, FILE_MODALITIES.index(m))
            if m in row.ambiguous
            else None
        )
        path = root / row.path(m)
        fmt = row.formats[m]
        data: bytes | None = None
        if m == "image":
            im = _render_image(row, rm)
            if amb is not None:
                im = _ambiguous_image(im, amb)
            if near is not None:  # a re-scan: brightness shift and a one-pixel crop
                from PIL import Image, ImageEnhance

                im = ImageEnhance.Brightness(im).enhance(float(near.uniform(0.9, 1.1)))
                w, h = im.size
                im = im.crop((1, 1, w, h)).resize((w, h), Image.Resampling.BILINEAR)
            data = _image_bytes(im, fmt, rm)
        elif m == "audio":
            x, rate = _render_audio(row, rm)
            if amb is not None:
                x = _ambiguous_audio(x, amb)
            data = _audio_bytes(x, rate, fmt)
        elif m == "video":
            frames, fps = _render_video(row, rm)
            if amb is not None:
                frames = _ambiguous_video(frames, amb)
            videos.append((frames, fps, path))
            continue
        elif m == "pointcloud":
            p = _render_points(row, rm)
            if amb is not None:
                p = _ambiguous_points(p, amb)
            if row.corrupt.get(m) == "non_finite":  # NaN coordinates in a well-formed file
                p[rm.choice(len(p), size=max(1, len(p) // 50), replace=False)] = np.nan
            _write_points(p, path)
        else:
            traj = _trajectory(row.label, row.writer, rm)
            if amb is not None:
                traj = _ambiguous_trajectory(traj, amb)
            data = _signal_bytes(traj, fmt)
        data = _maybe_corrupt(row, m, path, data, seed)
        if data is not None:
            path.write_bytes(data)
        sizes[m] = path.stat().st_size
    return sizes


def _maybe_corrupt(
    row: RowPlan, modality: str, path: Path, data: bytes | None, seed: int
) -> bytes | None:
    """The bytes to write for ``modality`` of ``row``: corrupted when the plan says so.

    ``data`` None means the file is already on disk (written by open3d/ffmpeg).
    """
    kind = row.corrupt.get(modality)
    if kind is None or (modality == "pointcloud" and kind == "non_finite"):
        return data  # NaN point clouds are made before writing
    bad = _rng(seed, _TAG_GLOBAL, 1, row.index, FILE_MODALITIES.index(modality))
    return _corrupt_bytes(modality, kind, path.read_bytes() if data is None else data, bad)


def _render_chunk(rows: list[RowPlan], root: str, seed: int) -> list[dict[str, int]]:
    """Renders a chunk of rows (one worker task). Returns per-row file sizes."""
    # Keep every worker single-threaded: the pool provides the parallelism.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    root_p = Path(root)
    sizes: list[dict[str, int]] = []
    owners: list[int] = []  # chunk position of each clip's row
    videos: list[tuple[np.ndarray, int, Path]] = []
    for k, row in enumerate(rows):
        before = len(videos)
        sizes.append(_render_row(row, root_p, seed, videos))
        owners += [k] * (len(videos) - before)
    _encode_mp4_batch(videos)
    for k, (_, _, path) in zip(owners, videos, strict=True):
        data = _maybe_corrupt(rows[k], "video", path, None, seed)
        if data is not None:
            path.write_bytes(data)
        sizes[k]["video"] = path.stat().st_size
    return sizes


# --------------------------------------------------------------------------- build


def _check_args(
    n: int,
    seed: int,
    workers: int,
    modality_drop: float,
    corrupt_frac: float,
    dup_frac: float,
    hard_frac: float = 0.0,
) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise CorpusError(f"n must be a positive integer, got {n!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise CorpusError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise CorpusError(f"workers must be a positive integer, got {workers!r}")
    for name, v, hi in (
        ("modality_drop", modality_drop, 0.95),
        ("corrupt_frac", corrupt_frac, 0.5),
        ("dup_frac", dup_frac, 0.5),
        ("hard_frac", hard_frac, 0.5),
    ):
        if not isinstance(v, int | float) or not (0.0 <= float(v) <= hi):
            raise CorpusError(f"{name} must be a number in [0, {hi}], got {v!r}")
    for tool in ("espeak-ng", "ffmpeg"):
        if shutil.which(tool) is None:
            raise CorpusError(f"{tool} is required to build the corpus but is not on PATH")


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CorpusError(f"output path {out} exists and is not a directory")
    if (out / "manifest.jsonl").exists() or any((out / d).exists() for d in SUBDIRS.values()):
        if not overwrite:
            raise CorpusError(
                f"{out} already holds a corpus; pass overwrite=True (--overwrite) to rebuild it"
            )
        # Remove only what a build writes, never anything else in the folder.
        for d in SUBDIRS.values():
            shutil.rmtree(out / d, ignore_errors=True)
        for f in ("manifest.jsonl", "corpus_info.json"):
            (out / f).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for d in SUBDIRS.values():
        (out / d).mkdir()


#: Corpora up to this many rows are rendered in the calling process (see build_corpus).
_MIN_ROWS_FOR_POOL = 100


def build_corpus(
    out: str | os.PathLike[str],
    *,
    n: int,
    seed: int,
    workers: int = 2,
    modality_drop: float = 0.15,
    corrupt_frac: float = 0.01,
    dup_frac: float = 0.01,
    hard_frac: float = 0.05,
    overwrite: bool = False,
) -> Path:
    """Builds the OmniDigits corpus.

    Args:
        out: output folder (created; must not already hold a corpus unless ``overwrite``).
        n: number of manifest rows (duplicates included).
        seed: RNG seed; same seed -> same manifest and byte-identical files.
        workers: at most this many worker processes (1 = in this process; corpora of up to
            100 rows are always built in this process). Output does not depend on it.
        modality_drop: probability that a row lacks a given modality (each row keeps >= 1).
        corrupt_frac: fraction of files written deliberately corrupt (>= 1 file when > 0).
        dup_frac: fraction of rows that duplicate an earlier row under a new id (>= 1 when
            > 0 and n >= 2); half exact copies, half near duplicates.
        hard_frac: probability that an instance of a modality is ambiguous on its own
            (see the module docstring); 0 renders every instance clearly.
        overwrite: replace an existing corpus in ``out``.

    Returns:
        Path of ``out/manifest.jsonl``. ``out/corpus_info.json`` lists counts per modality,
        corrupt files and duplicates.

    Raises:
        CorpusError: bad arguments, a missing external tool, or an occupied ``out``.
    """
    _check_args(n, seed, workers, modality_drop, corrupt_frac, dup_frac, hard_frac)
    t0 = time.perf_counter()
    root = Path(out)
    _prepare_out(root, overwrite)
    rows = _plan_rows(
        n, seed, float(modality_drop), float(corrupt_frac), float(dup_frac), float(hard_frac)
    )

    # Chunks of ~40 rows: small enough to balance the load, big enough to share ffmpeg
    # processes (see _FFMPEG_BATCH) and amortize pickling.
    n_chunks = min(n, max(workers, math.ceil(n / 40)))
    bounds = np.linspace(0, n, n_chunks + 1).astype(int)
    chunks = [rows[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    sizes: list[dict[str, int]] = []
    # A spawned worker spends seconds importing open3d/scipy/sklearn before rendering, more
    # than a small corpus takes to render here (n=60: ~6 s in-process vs ~7 s with two
    # workers on an idle 2-core machine), so small builds stay in this process.
    processes = 1 if n <= _MIN_ROWS_FOR_POOL else min(workers, len(chunks))
    if processes == 1:
        for c in chunks:
            sizes.extend(_render_chunk(c, str(root), seed))
    else:
        # spawn: a clean interpreter per worker (no forked Ray/open3d/torch state).
        with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
            for res in pool.map(_render_chunk, chunks, [str(root)] * len(chunks),
                                [seed] * len(chunks)):  # fmt: skip
                sizes.extend(res)

    manifest = root / "manifest.jsonl"
    tmp = root / "manifest.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            rec: dict[str, Any] = {"id": row.id}
            if row.text is not None:
                rec["text"] = row.text
            for m in FILE_MODALITIES:
                if m in row.formats:
                    rec[m] = row.path(m)
            rec["label"] = str(row.label)
            rec["group"] = row.group
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, manifest)  # the manifest appears only once every file is written

    info = _corpus_info(rows, sizes, n=n, seed=seed, workers=workers, processes=processes,
                        modality_drop=modality_drop, corrupt_frac=corrupt_frac,
                        dup_frac=dup_frac, hard_frac=hard_frac,
                        seconds=time.perf_counter() - t0)  # fmt: skip
    (root / "corpus_info.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return manifest


def _corpus_info(rows: list[RowPlan], sizes: list[dict[str, int]], **params: Any) -> dict:
    counts = {m: 0 for m in MODALITIES}
    formats: dict[str, dict[str, int]] = {m: {} for m in FILE_MODALITIES}
    labels = {str(d): 0 for d in range(10)}
    for row in rows:
        labels[str(row.label)] += 1
        if row.text is not None:
            counts["text"] += 1
        for m, ext in row.formats.items():
            counts[m] += 1
            formats[m][ext] = formats[m].get(ext, 0) + 1
    corrupt = [
        {"id": row.id, "modality": m, "path": row.path(m), "kind": kind}
        for row in rows
        for m, kind in sorted(row.corrupt.items())
    ]
    dups = [
        {"id": row.id, "duplicate_of": rows[row.dup_of].id, "kind": row.dup_kind}
        for row in rows
        if row.dup_of is not None
    ]
    ambiguous = [{"id": row.id, "modality": m} for row in rows for m in row.ambiguous]
    writers = {row.group: row.writer for row in rows}
    seconds = params.pop("seconds")
    return {
        "version": CORPUS_VERSION,
        "params": params,
        "rows": len(rows),
        "counts": counts,
        "formats": formats,
        "labels": labels,
        "groups": len(writers),
        "bytes": int(sum(sum(s.values()) for s in sizes)),
        "corrupt": corrupt,
        "corrupt_ids": sorted({c["id"] for c in corrupt}),
        "duplicates": dups,
        "duplicate_ids": [d["id"] for d in dups],
        "ambiguous": ambiguous,
        "ambiguous_counts": {m: sum(a["modality"] == m for a in ambiguous) for m in MODALITIES},
        "writers": {g: asdict(w) for g, w in sorted(writers.items())},
        "layout": {
            "signal": "npy float32 (3, L) channels x,y,pen; csv header x,y,pen, one step a line",
            "image": "PNG/JPEG, L or RGB, 32-64 px, dark ink on light paper",
            "audio": "WAV/FLAC PCM16, 16000 or 22050 Hz, mono or stereo",
            "video": "H.264 yuv420p MP4, 64x64, 12-20 frames",
            "pointcloud": "PLY (binary) / PCD (binary) / XYZ (ascii), 1024-2048 points",
        },
        "build_seconds": round(seconds, 3),
    }


def file_digest(root: str | os.PathLike[str]) -> dict[str, str]:
    """SHA-256 of every file a build writes, by relative path (corpus_info.json excluded,
    since it records the build time)."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "corpus_info.json":
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# --------------------------------------------------------------------------- CLI


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.demo_corpus",
        description="Build the OmniDigits demo corpus (digits 0-9 in text, image, audio, "
        "video, pointcloud and signal) as manifest.jsonl + files.",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--n", type=int, default=2000, help="number of rows (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="RNG seed (default 0)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--modality-drop", type=float, default=0.15,
                   help="per-modality drop probability (default 0.15)")  # fmt: skip
    p.add_argument("--corrupt-frac", type=float, default=0.01,
                   help="fraction of files written corrupt (default 0.01)")  # fmt: skip
    p.add_argument("--dup-frac", type=float, default=0.01,
                   help="fraction of duplicate rows (default 0.01)")  # fmt: skip
    p.add_argument("--hard-frac", type=float, default=0.05,
                   help="per-modality probability of an ambiguous instance (default 0.05)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing corpus")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        manifest = build_corpus(
            args.out,
            n=args.n,
            seed=args.seed,
            workers=args.workers,
            modality_drop=args.modality_drop,
            corrupt_frac=args.corrupt_frac,
            dup_frac=args.dup_frac,
            hard_frac=args.hard_frac,
            overwrite=args.overwrite,
        )
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = json.loads((manifest.parent / "corpus_info.json").read_text())
    print(
        f"wrote {manifest} ({info['rows']} rows, {len(info['corrupt'])} corrupt files, "
        f"{len(info['duplicates'])} duplicates) in {info['build_seconds']:.1f}s; "
        f"counts {info['counts']}"
    )
    return 0


if __name__ == "__main__":
    # Import by the package name so worker processes unpickle the same classes.
    from pipelines.demo_corpus import main as _main

    sys.exit(_main())
