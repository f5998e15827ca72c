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

    python -m jobs.demo.corpus --out data/omnidigits --n 2000 --seed 0 --workers 2

    from jobs.demo.corpus import build_corpus
    manifest = build_corpus("data/omnidigits", n=2000, seed=0, workers=2)

Layout of this package: :mod:`~jobs.demo.corpus.plan` (rows), one ``render_<m>.py`` per
modality, :mod:`~jobs.demo.corpus.corrupt` (broken files), this module (workers, build,
``corpus_info.json``) and :mod:`~jobs.demo.corpus.cli`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from jobs.demo.corpus.corrupt import _corrupt_bytes
from jobs.demo.corpus.plan import (
    _TAG_AMBIG_RENDER,
    _TAG_GLOBAL,
    _TAG_NEAR,
    _TAG_RENDER,
    CORPUS_VERSION,
    FILE_MODALITIES,
    MODALITIES,
    SUBDIRS,
    CorpusError,
    RowPlan,
    _plan_rows,
    _rng,
)
from jobs.demo.corpus.render_audio import _ambiguous_audio, _audio_bytes, _render_audio
from jobs.demo.corpus.render_image import _ambiguous_image, _image_bytes, _render_image, _rescan
from jobs.demo.corpus.render_pointcloud import _ambiguous_points, _render_points, _write_points
from jobs.demo.corpus.render_signal import _ambiguous_trajectory, _signal_bytes, _trajectory
from jobs.demo.corpus.render_tabular import row_record
from jobs.demo.corpus.render_video import _ambiguous_video, _encode_mp4_batch, _render_video


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
            if near is not None:
                im = _rescan(im, near)
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
            if row.tabular:
                rec["tabular"] = row_record(row, rows, seed)
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
        counts["tabular"] += int(row.tabular)
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
            "tabular": "inline JSON object: stroke statistics + writer metadata (render_tabular)",
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
