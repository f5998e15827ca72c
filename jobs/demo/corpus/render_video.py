"""Video of the OmniDigits corpus: the digit drawn stroke by stroke, or the handwritten
glyph moving across the frame; 12-20 frames, 64x64, H.264 MP4 (``ffmpeg`` CLI, bit-exact)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from jobs.demo.corpus.plan import _sklearn_digits
from jobs.demo.corpus.render_signal import _trajectory

if TYPE_CHECKING:
    from jobs.demo.corpus.plan import RowPlan


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
