"""Row planning of the OmniDigits corpus (parent process only).

Every row is planned from RNGs derived from ``(seed, row)``: its label, writer, which
modalities it keeps and in which file format, the real image it shows, which rows are
duplicates, which files are corrupt and which instances are ambiguous. Workers only
render planned rows, so the corpus does not depend on the worker count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from jobs.demo.corpus.corrupt import CORRUPT_KINDS
from jobs.demo.corpus.render_text import _VAGUE_TEXT, _make_text, _near_text

MODALITIES: tuple[str, ...] = (
    "text", "image", "audio", "video", "pointcloud", "signal", "tabular",
)  # fmt: skip
#: Modalities stored as files (text and tabular are inline in the manifest).
FILE_MODALITIES: tuple[str, ...] = ("image", "audio", "video", "pointcloud", "signal")
#: Sub-folder of the corpus root per file modality.
SUBDIRS: dict[str, str] = {
    "image": "images",
    "audio": "audio",
    "video": "video",
    "pointcloud": "points",
    "signal": "signals",
}
CORPUS_VERSION = "omnidigits-3"  # 3: the tabular column

_EN_VOICES: tuple[str, ...] = ("en", "en-us", "en-gb-scotland", "en-029", "en-gb-x-rp")
_VARIANTS: tuple[str, ...] = (
    "", "+f1", "+f2", "+f3", "+f4", "+m1", "+m2", "+m3", "+m4", "+m5", "+klatt", "+croak",
)  # fmt: skip
_INKS: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (20, 30, 120), (10, 60, 20), (90, 10, 10))


class CorpusError(ValueError):
    """Bad build arguments, or an output folder that cannot be used."""


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
    #: the row has an inline tabular record (rendered by ``render_tabular``).
    tabular: bool = False

    def path(self, modality: str) -> str:
        return f"{SUBDIRS[modality]}/{self.index:06d}.{self.formats[modality]}"


def _rng(seed: int, *tags: int) -> np.random.Generator:
    # A SeedSequence over (seed, tags) gives independent streams per purpose and per row,
    # so row i's content never depends on how rows are split between workers.
    return np.random.default_rng(np.random.SeedSequence([seed, *tags]))


_TAG_PLAN, _TAG_RENDER, _TAG_WRITER, _TAG_GLOBAL, _TAG_NEAR = 0, 1, 2, 3, 4
# Own streams for ambiguity, so every other byte of a row is the same with any hard_frac.
_TAG_AMBIG_PLAN, _TAG_AMBIG_RENDER = 5, 6


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
                tabular="tabular" in present,
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
        row.tabular = src.tabular
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


@lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) float in [0, 16], labels (1797,) int)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)
