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
from pipelines.featurize.sandbox import can_isolate, run_isolated


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
    claims = mp4_claims(data)
    return None if claims.width is None else (claims.width, claims.height)


@dataclass
class ContainerClaims:
    """What a container's header says about its video, before anything is decoded.

    Attributes:
        frames: Largest frame (sample) count any video track claims.
        seconds: Longest duration claimed (movie or track).
        width: Largest frame width claimed.
        height: Height of that frame.
        min_bytes: Bytes the claimed samples need at least (sample tables with a fixed
            sample size); a file shorter than this lies.
    """

    frames: int = 0
    seconds: float = 0.0
    width: int | None = None
    height: int | None = None
    min_bytes: int = 0

    def frame(self, w: int, h: int) -> None:
        if self.width is None or w * h > self.width * (self.height or 0):
            self.width, self.height = int(w), int(h)


_U32 = struct.Struct(">I")


def _mp4_duration(payload: bytes) -> tuple[int, int]:
    """(timescale, duration) of an ``mvhd``/``mdhd`` payload (version 0 or 1)."""
    if not payload:
        return 0, 0
    if payload[0] == 1 and len(payload) >= 32:
        return _U32.unpack_from(payload, 20)[0], struct.unpack_from(">Q", payload, 24)[0]
    if len(payload) >= 20:
        return _U32.unpack_from(payload, 12)[0], _U32.unpack_from(payload, 16)[0]
    return 0, 0


def mp4_claims(data: bytes) -> ContainerClaims:
    """Frame counts (``stts``/``stsz``), durations (``mvhd``/``mdhd``) and frame sizes
    (``tkhd``) an MP4/MOV header claims, read without decoding.

    A sample table whose entries do not fit in their box is ``truncated``.
    """
    c = ContainerClaims()

    def seconds(payload: bytes) -> None:
        scale, dur = _mp4_duration(payload)
        if scale > 0:
            c.seconds = max(c.seconds, dur / scale)

    def table(kind: bytes, p: bytes) -> None:
        if kind == b"stts" and len(p) >= 8:
            n = _U32.unpack_from(p, 4)[0]
            if 8 + 8 * n > len(p):
                raise SampleError("truncated", f"stts claims {n} entries, box holds {len(p)} B")
            counts = np.frombuffer(p, ">u4", count=2 * n, offset=8)[0::2]
            c.frames = max(c.frames, int(counts.sum(dtype=np.uint64)))
        elif kind == b"stsz" and len(p) >= 12:
            size, n = _U32.unpack_from(p, 4)[0], _U32.unpack_from(p, 8)[0]
            if size == 0 and 12 + 4 * n > len(p):
                raise SampleError("truncated", f"stsz claims {n} samples, box holds {len(p)} B")
            c.frames = max(c.frames, n)
            c.min_bytes = max(c.min_bytes, size * n)

    def walk(a: int, b: int, depth: int) -> None:
        for kind, pa_, pb in _boxes(data, a, b):
            if kind == b"mvhd" or kind == b"mdhd":
                seconds(data[pa_:pb])
            elif kind == b"tkhd" and pb - pa_ >= 84:
                w, h = struct.unpack(">II", data[pb - 8 : pb])
                c.frame(w >> 16, h >> 16)  # 16.16 fixed point
            elif kind in (b"stts", b"stsz"):
                table(kind, data[pa_:pb])
            elif kind in (b"moov", b"trak", b"mdia", b"minf", b"stbl") and depth < 8:
                walk(pa_, pb, depth + 1)

    walk(0, len(data), 0)
    return c


_RIFF_CHUNK = struct.Struct("<4sI")


def avi_claims(data: bytes) -> ContainerClaims:
    """Frame count (``avih``/``strh``), frame rate and size (``avih``/``strf``) an AVI
    (RIFF) header claims."""
    c = ContainerClaims()

    def walk(a: int, b: int, depth: int) -> None:
        pos = a
        while pos + 8 <= b:
            cid, size = _RIFF_CHUNK.unpack_from(data, pos)
            body, end = pos + 8, min(b, pos + 8 + size)
            if cid == b"LIST" and depth < 4 and end - body >= 4:
                if data[body : body + 4] in (b"hdrl", b"strl"):
                    walk(body + 4, end, depth + 1)
            elif cid == b"avih" and end - body >= 40:
                us, _, _, _, total, _, _, _, w, h = struct.unpack_from("<10I", data, body)
                c.frames = max(c.frames, total)
                c.frame(w, h)
                if us:
                    c.seconds = max(c.seconds, total * us / 1e6)
            elif cid == b"strh" and end - body >= 36 and data[body : body + 4] == b"vids":
                scale, rate, _, length = struct.unpack_from("<4I", data, body + 20)
                c.frames = max(c.frames, length)
                if rate:
                    c.seconds = max(c.seconds, length * scale / rate)
            elif cid == b"strf" and end - body >= 12 and depth >= 2:
                w, h = struct.unpack_from("<ii", data, body + 4)
                if c.width is not None:  # a video stream's BITMAPINFOHEADER
                    c.frame(abs(w), abs(h))
            pos = body + size + (size & 1)

    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        walk(12, len(data), 0)
    return c


def _vint(data: bytes, pos: int, keep_marker: bool) -> tuple[int, int]:
    """An EBML variable-length integer at ``pos`` -> (value, next position); value -1 for
    an "unknown" size."""
    if pos >= len(data) or data[pos] == 0:
        raise ValueError("bad EBML vint")
    first = data[pos]
    n = 8 - first.bit_length() + 1
    if pos + n > len(data):
        raise ValueError("EBML vint past the end")
    v = first if keep_marker else first & ((1 << (8 - n)) - 1)
    for k in range(1, n):
        v = (v << 8) | data[pos + k]
    if not keep_marker and v == (1 << (7 * n)) - 1:
        return -1, pos + n
    return v, pos + n


# EBML ids (marker kept) of the Matroska elements read by mkv_claims.
_MKV_SEGMENT, _MKV_INFO, _MKV_TRACKS, _MKV_TRACK = 0x18538067, 0x1549A966, 0x1654AE6B, 0xAE
_MKV_SCALE, _MKV_DURATION, _MKV_DEFAULT_DURATION = 0x2AD7B1, 0x4489, 0x23E383
_MKV_VIDEO, _MKV_WIDTH, _MKV_HEIGHT = 0xE0, 0xB0, 0xBA
_MKV_CONTAINERS = (_MKV_SEGMENT, _MKV_INFO, _MKV_TRACKS, _MKV_TRACK)


def mkv_claims(data: bytes) -> ContainerClaims:
    """Duration (``Info``), frame rate (``DefaultDuration``) and frame sizes (``Video``) a
    Matroska/WebM header claims; frames = duration / frame duration."""
    c = ContainerClaims()
    found: dict[int, float] = {}
    frame_ns: list[int] = []

    def walk(a: int, b: int, depth: int, store: dict[int, float]) -> None:
        pos = a
        while pos < b:
            try:
                eid, p = _vint(data, pos, True)
                size, p = _vint(data, p, False)
            except ValueError:
                return
            end = b if size < 0 else min(b, p + size)
            if eid == _MKV_VIDEO and depth < 6:
                video: dict[int, float] = {}
                walk(p, end, depth + 1, video)
                c.frame(int(video.get(_MKV_WIDTH, 0)), int(video.get(_MKV_HEIGHT, 0)))
            elif eid in _MKV_CONTAINERS and depth < 6:
                walk(p, end, depth + 1, store)
            elif eid == _MKV_DURATION and end - p in (4, 8):
                store[eid] = struct.unpack(">f" if end - p == 4 else ">d", data[p:end])[0]
            elif eid in (_MKV_SCALE, _MKV_DEFAULT_DURATION, _MKV_WIDTH, _MKV_HEIGHT):
                if 0 < end - p <= 8:
                    v = int.from_bytes(data[p:end], "big")
                    if eid == _MKV_DEFAULT_DURATION:
                        frame_ns.append(v)
                    else:
                        store[eid] = v
            if size < 0:
                return
            pos = p + size

    walk(0, len(data), 0, found)
    duration = found.get(_MKV_DURATION)
    if duration is not None:
        if not np.isfinite(duration) or duration < 0:
            raise SampleError("decode_error", f"Matroska duration {duration!r}")
        ns = duration * found.get(_MKV_SCALE, 1_000_000)
        c.seconds = ns / 1e9
        if frame_ns and min(frame_ns) > 0:
            c.frames = int(min(ns / min(frame_ns), 2**63))
    return c


def container_claims(data: bytes, suffix: str | None = None) -> ContainerClaims:
    """The header claims of a video file, by its magic bytes (MP4/MOV, AVI, MKV/WebM);
    empty claims for a container not parsed here (the isolated decoder still guards)."""
    kind = VideoFeaturizer.sniff(data) or suffix
    if kind in (".mp4", ".mov", ".m4v"):
        return mp4_claims(data)
    if kind == ".avi":
        return avi_claims(data)
    if kind in (".mkv", ".webm"):
        return mkv_claims(data)
    return ContainerClaims()


@register("video")
class VideoFeaturizer(Featurizer):
    """Video -> uint8 (num_frames, size, size, 3)."""

    @dataclass
    class Config:
        """Video -> uint8 (num_frames, size, size, 3), frames sampled uniformly.

        Attributes:
            num_frames: Frames sampled uniformly over the clip.
            size: Output height and width (shorter side resize + centre crop).
            max_frames: Clips with more frames are ``too_large`` (checked from the
                container header, then from the decoder's index).
            max_pixels: Frames with more pixels are ``too_large``.
            max_seconds: Clips whose header claims a longer duration are ``too_large``.
            isolate: Decode in a sacrificial child process (:mod:`.sandbox`), so that a
                decoder abort or runaway allocation costs only that child.
            decode_memory_mb: Address space the decoding child may add.
            decode_timeout_s: Wall-clock limit of one clip's decode.
        """

        num_frames: int = 8
        size: int = 32
        max_frames: int = 100_000
        max_pixels: int = 8_300_000
        max_seconds: float = 4 * 3600.0
        isolate: bool = True
        decode_memory_mb: int = 1024
        decode_timeout_s: float = 30.0

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

    def check_header(self, data: bytes, suffix: str | None = None) -> ContainerClaims:
        """Refuses a clip from what its container header claims, before any decoder runs:
        frames, duration and frame size over the limits (``too_large``), or more samples
        than the file has bytes for (``truncated``: the header lies)."""
        cfg = self.section
        trunc = isobmff_truncation(data)
        if trunc is not None:
            raise SampleError("truncated", trunc)
        c = container_claims(data, suffix)
        if c.frames > cfg.max_frames:
            raise SampleError("too_large", f"header claims {c.frames} frames > max_frames")
        if c.frames > len(data) or c.min_bytes > len(data):
            raise SampleError(
                "truncated", f"header claims {c.frames} frames, the file has {len(data)} bytes"
            )
        if not c.seconds <= cfg.max_seconds:  # also NaN
            raise SampleError(
                "too_large", f"header claims {c.seconds:.4g} s > max_seconds={cfg.max_seconds}"
            )
        if c.width is not None and c.width * (c.height or 0) > cfg.max_pixels:
            raise SampleError("too_large", f"frame {c.width}x{c.height} > max_pixels")
        return c

    def from_bytes(self, data: bytes, suffix: str | None = None) -> np.ndarray:
        """Decodes one video file and samples its frames: header checks in this process,
        then decord in an isolated child (``isolate``).

        Raises:
            SampleError: ``empty``, ``truncated``, ``decode_error``, ``too_large``,
                ``decoder_crashed``.
        """
        n_sample = self.section.num_frames
        clips, _, _ = self._decode_safely(
            data, suffix, lambda n, fps: [uniform_indices(n, n_sample)]
        )
        return clips[0]

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
        sampled uniformly like a clip of that length (decoded behind the same boundary as
        :meth:`from_bytes`)."""
        if raw is None:
            raise SampleError("empty", "no data")
        n_sample = self.section.num_frames

        def plan(n: int, fps: float) -> list[np.ndarray]:
            out = []
            for s, e in window_spans(n / fps, window_s, hop_s):
                lo = min(int(round(s * fps)), n - 1)
                hi = min(max(int(round(e * fps)), lo + 1), n)
                out.append(lo + uniform_indices(hi - lo, n_sample))
            return out

        if isinstance(raw, bytes | bytearray | memoryview):
            clips, fps, n = self._decode_safely(bytes(raw), suffix, plan, rate_hz)
        elif isinstance(raw, np.ndarray):
            a = raw
            n, fps = (int(a.shape[0]) if a.ndim == 4 else 0), float(rate_hz or 1.0)
            if n <= 0:
                raise SampleError("empty", "no frames")
            clips = [self.from_array(a[idx]) for idx in plan(n, fps)]
        else:
            return super().decode_windows(raw, suffix, window_s=window_s, hop_s=hop_s)
        spans = window_spans(n / fps, window_s, hop_s)
        return [(s, e, c) for (s, e), c in zip(spans, clips, strict=True)]

    def _decode_safely(
        self,
        data: bytes,
        suffix: str | None,
        plan: Any,
        rate_hz: float | None = None,
    ) -> tuple[list[np.ndarray], float, int]:
        """Header checks here, then :meth:`_decode` in an isolated child when configured:
        the clips of frame indices ``plan(n_frames, fps)``, the frame rate and frame count."""
        if not data:
            raise SampleError("empty", "zero-byte video")
        cfg = self.section
        claims = self.check_header(data, suffix)
        if cfg.isolate and can_isolate():
            import decord  # noqa: F401 - loaded once here, inherited by the forked child

            def child() -> dict[str, np.ndarray]:
                clips, fps, n = self._decode(data, claims, plan, rate_hz)
                out = {f"clip{i}": c for i, c in enumerate(clips)}
                out["meta"] = np.array([fps, n], dtype=np.float64)
                return out

            res = run_isolated(
                child,
                memory_mb=cfg.decode_memory_mb,
                timeout_s=cfg.decode_timeout_s,
                what="video decoder",
            )
            fps, n = float(res["meta"][0]), int(res["meta"][1])
            clips = [res[f"clip{i}"] for i in range(len(res) - 1)]
        else:
            clips, fps, n = self._decode(data, claims, plan, rate_hz)
        return clips, fps, n

    def _decode(
        self, data: bytes, claims: ContainerClaims, plan: Any, rate_hz: float | None = None
    ) -> tuple[list[np.ndarray], float, int]:
        import decord  # lazy: decord loads ffmpeg libraries

        cfg = self.section
        try:
            vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
        except Exception as e:  # noqa: BLE001 - decord raises DECORDError/RuntimeError/Assertion
            raise SampleError("decode_error", f"{type(e).__name__}: {str(e)[:200]}") from e
        n = len(vr)
        if n <= 0:
            raise SampleError("empty", "no frames")
        if n > cfg.max_frames:
            raise SampleError("too_large", f"{n} frames > max_frames={cfg.max_frames}")
        clips = []
        try:
            size = None if claims.width is None else (claims.width, claims.height or 0)
            if size is None or size[0] * size[1] == 0:
                # No frame size in the header: decode one frame to learn it.
                first = vr[0].shape  # (H, W, 3)
                size = (first[1], first[0])
            if size[0] * size[1] > cfg.max_pixels:
                raise SampleError("too_large", f"frame {size[0]}x{size[1]} > max_pixels")
            fps = float(vr.get_avg_fps() or 0.0) or float(rate_hz or 1.0)
            for idx in plan(n, fps):
                idx = np.asarray(idx).tolist()
                try:
                    frames = vr.get_batch(idx).asnumpy()
                except decord.DECORDError:
                    # decord's batch copy fails on frames whose width is not a multiple of
                    # 32 (its row padding, e.g. 16x16, 48x48): let ffmpeg scale to the next.
                    w32 = -(-int(size[0]) // 32) * 32
                    vr = decord.VideoReader(
                        io.BytesIO(data), ctx=decord.cpu(0), num_threads=1, width=w32,
                        height=int(size[1]),
                    )  # fmt: skip
                    frames = vr.get_batch(idx).asnumpy()
                clips.append(self._resize(frames))
        except SampleError:
            raise
        except Exception as e:  # noqa: BLE001 - corrupt streams fail at decode time
            raise SampleError("decode_error", f"{type(e).__name__}: {str(e)[:200]}") from e
        return clips, fps, n

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
