"""Video featurizer: MP4/AVI/MKV/WebM (decord) -> uint8 (F, size, size, 3).

``F = num_frames`` frames are sampled uniformly (centre of F equal segments), then each
is resized (shorter side) and centre-cropped like images.
"""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipelines.featurize import register
from pipelines.featurize.base import Featurizer, SampleError, window_spans
from pipelines.featurize.image import resize_center_crop


def uniform_indices(n_total: int, n_sample: int) -> np.ndarray:
    """Indices of the centres of ``n_sample`` equal segments of ``range(n_total)``."""
    return np.minimum(
        ((np.arange(n_sample) + 0.5) * n_total / n_sample).astype(np.int64), n_total - 1
    )


def isobmff_truncation(data: bytes) -> str | None:
    """For MP4/MOV (ISO BMFF) bytes, a message if a top-level box runs past the end."""
    if len(data) < 8 or data[4:8] not in (b"ftyp", b"styp", b"moov", b"mdat", b"free", b"wide"):
        return None
    pos = 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if size == 1:
            if pos + 16 > len(data):
                return f"box {kind!r} header cut at byte {pos}"
            size = struct.unpack(">Q", data[pos + 8 : pos + 16])[0]
        elif size == 0:  # box extends to the end of the file
            return None
        if size < 8:
            return None  # not a sane box structure: let the decoder judge
        if pos + size > len(data):
            return f"box {kind.decode('latin-1')!r} needs {pos + size} bytes, file has {len(data)}"
        pos += size
    return None if pos == len(data) else f"{len(data) - pos} stray bytes after the last box"


def _boxes(data: bytes, start: int, end: int):
    """Yields ``(type, payload_start, box_end)`` of the ISO BMFF boxes in a byte range."""
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        head = 8
        if size == 1 and pos + 16 <= end:
            size, head = struct.unpack(">Q", data[pos + 8 : pos + 16])[0], 16
        elif size == 0:
            size = end - pos
        if size < head or pos + size > end:
            return
        yield kind, pos + head, pos + size
        pos += size


def mp4_frame_size(data: bytes) -> tuple[int, int] | None:
    """Largest (width, height) of the tracks in an MP4's ``moov/trak/tkhd``, or None.

    Read from the header, so a decompression-bomb resolution is refused before any
    frame is decoded.
    """
    best = None
    for kind, a, b in _boxes(data, 0, len(data)):
        if kind != b"moov":
            continue
        for tkind, ta, tb in _boxes(data, a, b):
            if tkind != b"trak":
                continue
            for hkind, ha, hb in _boxes(data, ta, tb):
                if hkind == b"tkhd" and hb - ha >= 84:
                    w, h = struct.unpack(">II", data[hb - 8 : hb])
                    w, h = w >> 16, h >> 16  # 16.16 fixed point
                    if best is None or w * h > best[0] * best[1]:
                        best = (w, h)
    return best


@register("video")
class VideoFeaturizer(Featurizer):
    """Video -> uint8 (num_frames, size, size, 3)."""

    @dataclass
    class Config:
        """Video -> uint8 (num_frames, size, size, 3), frames sampled uniformly.

        Attributes:
            num_frames: Frames sampled uniformly over the clip.
            size: Output height and width (shorter side resize + centre crop).
            max_frames: Clips with more frames are ``too_large``.
            max_pixels: Frames with more pixels are ``too_large``.
        """

        num_frames: int = 8
        size: int = 32
        max_frames: int = 100_000
        max_pixels: int = 8_300_000

    suffixes = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v")
    windowed = True

    def warm_up(self) -> None:
        import decord  # noqa: F401 - loads the ffmpeg libraries

    def output_shape(self) -> tuple[int, int, int, int]:
        c = self.section
        return (c.num_frames, c.size, c.size, 3)

    @classmethod
    def sniff(cls, data: bytes) -> str | None:
        if data[4:8] == b"ftyp":
            return ".mov" if data[8:10] == b"qt" else ".mp4"
        if data.startswith(b"\x1aE\xdf\xa3"):
            return ".webm" if b"webm" in data[:64] else ".mkv"
        if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
            return ".avi"
        return None

    def example(self, rng: np.random.Generator, label: int = 0) -> tuple[Any, str | None]:
        """An H.264 MP4 (10 frames, 32x32) of a square moving in the direction ``label``
        (one of 10 angles) from one of four start points drawn from ``rng``.

        Encoded with the ffmpeg CLI like the demo corpus, and cached per (label, start);
        without ffmpeg the frames themselves are returned (``(array, None)``).
        """
        return _example_clip(int(label) % 10, int(rng.integers(0, 4)))

    def from_bytes(self, data: bytes, suffix: str | None = None) -> np.ndarray:
        """Decodes one video file and samples its frames.

        Raises:
            SampleError: ``empty``, ``truncated``, ``decode_error``, ``too_large``.
        """
        vr = self._open(data)
        return self._sample(vr, uniform_indices(len(vr), self.section.num_frames))

    def _open(self, data: bytes) -> Any:
        """Video bytes -> a decord ``VideoReader``, limits checked from the headers."""
        if not data:
            raise SampleError("empty", "zero-byte video")
        import decord  # lazy: decord loads ffmpeg libraries

        cfg = self.section
        trunc = isobmff_truncation(data)
        if trunc is not None:
            raise SampleError("truncated", trunc)
        try:
            vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
        except Exception as e:  # noqa: BLE001 - decord raises DECORDError/RuntimeError/Assertion
            raise SampleError("decode_error", f"{type(e).__name__}: {str(e)[:200]}") from e
        n = len(vr)
        if n <= 0:
            raise SampleError("empty", "no frames")
        if n > cfg.max_frames:
            raise SampleError("too_large", f"{n} frames > max_frames={cfg.max_frames}")
        try:
            size = mp4_frame_size(data)
            if size is None or size[0] * size[1] == 0:
                # Not MP4 (or no track header): decode one frame to learn the size.
                first = vr[0].shape  # (H, W, 3)
                size = (first[1], first[0])
        except Exception as e:  # noqa: BLE001 - corrupt streams fail at decode time
            raise SampleError("decode_error", f"{type(e).__name__}: {str(e)[:200]}") from e
        if size[0] * size[1] > cfg.max_pixels:
            raise SampleError("too_large", f"frame {size[0]}x{size[1]} > max_pixels")
        return vr

    def _sample(self, vr: Any, indices: np.ndarray) -> np.ndarray:
        """Frames ``indices`` of an open reader, resized: uint8 (F, size, size, 3)."""
        try:
            frames = vr.get_batch(np.asarray(indices).tolist()).asnumpy()
        except Exception as e:  # noqa: BLE001 - corrupt streams fail at decode time
            raise SampleError("decode_error", f"{type(e).__name__}: {str(e)[:200]}") from e
        return self._resize(frames)

    def decode_windows(
        self,
        raw: Any,
        suffix: str | None = None,
        *,
        window_s: float,
        hop_s: float,
        rate_hz: float | None = None,
    ) -> list[tuple[float | None, float | None, Any]]:
        """The clip cut into windows of time (:func:`window_spans`, at the container's
        frame rate; ``rate_hz``: frames per second of an array input, default 1), each
        sampled uniformly like a clip of that length."""
        if raw is None:
            raise SampleError("empty", "no data")
        n_sample = self.section.num_frames
        if isinstance(raw, bytes | bytearray | memoryview):
            vr = self._open(bytes(raw))
            n = len(vr)
            fps = float(vr.get_avg_fps() or 0.0) or float(rate_hz or 1.0)

            def take(idx: np.ndarray) -> np.ndarray:
                return self._sample(vr, idx)
        elif isinstance(raw, np.ndarray):
            a = raw
            n, fps = int(a.shape[0]) if a.ndim == 4 else 0, float(rate_hz or 1.0)

            def take(idx: np.ndarray) -> np.ndarray:
                return self.from_array(a[idx])
        else:
            return super().decode_windows(raw, suffix, window_s=window_s, hop_s=hop_s)
        if n <= 0:
            raise SampleError("empty", "no frames")
        out: list[tuple[float | None, float | None, Any]] = []
        for s, e in window_spans(n / fps, window_s, hop_s):
            lo = min(int(round(s * fps)), n - 1)
            hi = min(max(int(round(e * fps)), lo + 1), n)
            out.append((s, e, take(lo + uniform_indices(hi - lo, n_sample))))
        return out

    def from_array(self, array: np.ndarray, **_: Any) -> np.ndarray:
        """Featurizes frames (N, H, W, 3) uint8 (float in [0, 1] is scaled)."""
        a = np.asarray(array)
        if a.dtype.kind not in "uif":
            raise SampleError("bad_dtype", f"video array dtype {a.dtype}")
        if a.ndim != 4 or a.shape[-1] != 3:
            raise SampleError("bad_shape", f"video array shape {a.shape}, want (N, H, W, 3)")
        if a.shape[0] == 0 or a.size == 0:
            raise SampleError("empty", "no frames")
        cfg = self.section
        if a.shape[0] > cfg.max_frames or a.shape[1] * a.shape[2] > cfg.max_pixels:
            raise SampleError("too_large", f"video array shape {a.shape}")
        if a.dtype.kind == "f":
            if not np.isfinite(a).all():
                raise SampleError("non_finite", "video contains NaN or infinite values")
            a = np.clip(a, 0.0, 1.0) * 255.0 + 0.5
        a = np.clip(a, 0, 255).astype(np.uint8)
        return self._resize(a[uniform_indices(a.shape[0], cfg.num_frames)])

    def _resize(self, frames: np.ndarray) -> np.ndarray:
        size = self.section.size
        if frames.shape[1] == size and frames.shape[2] == size:
            return np.ascontiguousarray(frames, dtype=np.uint8)
        out = [resize_center_crop(Image.fromarray(np.ascontiguousarray(f)), size) for f in frames]
        return np.stack(out).astype(np.uint8)  # (F, size, size, 3)


def _example_frames(label: int, start: int) -> np.ndarray:
    """uint8 (10, 32, 32, 3): a dark 8x8 square moving at angle ``label * 36`` degrees."""
    ang = np.deg2rad(36.0 * label)
    x0, y0 = 12.0 + 4.0 * (start % 2) - 2.0, 12.0 + 4.0 * (start // 2) - 2.0
    frames = np.full((10, 32, 32, 3), 235, np.uint8)
    for k in range(10):
        x = int(round(x0 + 1.2 * k * np.cos(ang)))
        y = int(round(y0 + 1.2 * k * np.sin(ang)))
        frames[k, max(y, 0) : y + 8, max(x, 0) : x + 8] = (30, 60, 150)
    return frames


@lru_cache(maxsize=64)
def _example_clip(label: int, start: int) -> tuple[Any, str | None]:
    frames = _example_frames(label, start)
    if shutil.which("ffmpeg") is None:
        return frames, None
    with tempfile.TemporaryDirectory(prefix="omniray_video_") as tmp:
        out = Path(tmp) / "clip.mp4"
        cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "32x32", "-r", "10", "-i", "-",
               "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
               "-threads", "1", "-fflags", "+bitexact", "-flags:v", "+bitexact",
               "-map_metadata", "-1", str(out)]  # fmt: skip
        proc = subprocess.run(cmd, input=frames.tobytes(), capture_output=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"ffmpeg failed: {proc.stderr.decode(errors='replace')[-500:]}")
        return out.read_bytes(), ".mp4"
