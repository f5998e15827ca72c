"""Hostile inputs, generated in memory (nothing large is stored in the repository).

Shared by ``tests/test_hostile.py`` and ``benchmarks/hostile_inputs.py``. Each attack is a
small file whose header lies (a container claiming 2^31 frames, a point cloud claiming 10^9
vertices behind a comment line, a WAV at an absurd sample rate...), built by patching a
valid file that ffmpeg / soundfile / numpy wrote.
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

import numpy as np


@dataclass(frozen=True)
class Attack:
    """One hostile file.

    Attributes:
        name: Short name (also the file name stem in a corpus).
        attack_class: ``lying_header``, ``allocation_bomb`` or ``cost_bomb``.
        modality: The modality it is sent as.
        data: The file's bytes.
        suffix: Its suffix.
        reasons: Quarantine reasons (= service error codes) it may be refused with; empty
            when the input is valid and must be accepted at bounded cost.
    """

    name: str
    attack_class: str
    modality: str
    data: bytes
    suffix: str
    reasons: frozenset[str]


def have_ffmpeg() -> bool:
    return shutil.which("ffmpeg") is not None


@lru_cache(maxsize=8)
def ffmpeg_clip(suffix: str = ".mp4", size: str = "64x48", codec: str = "libx264") -> bytes:
    """A 12-frame test-pattern clip written by the ffmpeg CLI."""
    with tempfile.TemporaryDirectory(prefix="omniray_hostile_") as tmp:
        out = Path(tmp) / f"clip{suffix}"
        cmd = ["ffmpeg", "-loglevel", "error", "-nostdin", "-y", "-f", "lavfi",
               "-i", f"testsrc=size={size}:rate=10", "-frames:v", "12", "-c:v", codec,
               "-pix_fmt", "yuv420p" if codec != "mjpeg" else "yuvj420p", str(out)]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        return out.read_bytes()


def _mp4_box(data: bytes, path: list[bytes]) -> tuple[int, int]:
    """(payload start, end) of the box at ``path`` (e.g. ``[moov, trak, mdia, ...]``)."""
    from pipelines.featurize.video import _boxes

    a, b = 0, len(data)
    for kind in path:
        a, b = next((s, e) for k, s, e in _boxes(data, a, b) if k == kind)
    return a, b


_STBL = [b"moov", b"trak", b"mdia", b"minf", b"stbl"]


def mp4_lying_stts() -> bytes:
    """A valid H.264 MP4 whose ``stts`` claims 2^31 - 16 frames (decord: std::bad_alloc,
    abort() of the whole process)."""
    d = bytearray(ffmpeg_clip())
    struct.pack_into(">I", d, _mp4_box(bytes(d), [*_STBL, b"stts"])[0] + 8, 0x7FFFFFF0)
    return bytes(d)


def mp4_lying_duration() -> bytes:
    """``mvhd`` claims a 50-day movie."""
    d = bytearray(ffmpeg_clip())
    struct.pack_into(">I", d, _mp4_box(bytes(d), [b"moov", b"mvhd"])[0] + 16, 0xFFFFFFF0)
    return bytes(d)


def mp4_lying_size() -> bytes:
    """``tkhd`` claims 60000 x 60000 frames."""
    d = bytearray(ffmpeg_clip())
    end = _mp4_box(bytes(d), [b"moov", b"trak", b"tkhd"])[1]
    struct.pack_into(">II", d, end - 8, 60000 << 16, 60000 << 16)
    return bytes(d)


def avi_lying_frames() -> bytes:
    """An MJPEG AVI whose ``avih`` claims 2^31 - 16 frames."""
    d = bytearray(ffmpeg_clip(".avi", codec="mjpeg"))
    i = d.index(b"avih")
    struct.pack_into("<I", d, i + 8 + 16, 0x7FFFFFF0)
    return bytes(d)


def mkv_lying_duration() -> bytes:
    """A Matroska file whose ``Duration`` claims 10^15 ticks (decord: std::bad_alloc)."""
    d = bytearray(ffmpeg_clip(".mkv"))
    j = d.index(b"\x44\x89")
    n = d[j + 2] & 0x7F
    d[j + 3 : j + 3 + n] = struct.pack(">d" if n == 8 else ">f", 1e15)
    return bytes(d)


def ply_bomb(points: int = 1_000_000_000, comment: bool = True) -> bytes:
    """169 bytes of ASCII PLY claiming ``points`` vertices, a comment before the count."""
    c = b"comment made by a friendly tool\n" if comment else b""
    return (
        b"ply\nformat ascii 1.0\n" + c + b"element vertex %d\n" % points
        + b"property float x\nproperty float y\nproperty float z\nend_header\n0 0 0\n"
    )  # fmt: skip


def ply_binary_lie(points: int = 100_000) -> bytes:
    """A binary PLY claiming ``points`` vertices (within limits) with bytes for one."""
    return (
        b"ply\nformat binary_little_endian 1.0\nelement vertex %d\n" % points
        + b"property float x\nproperty float y\nproperty float z\nend_header\n"
        + b"\x00" * 12
    )


def pcd_bomb() -> bytes:
    return (
        b"# .PCD v0.7\nVERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\n"
        b"WIDTH 1000000000\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS 1000000000\n"
        b"DATA binary\n" + b"\x00" * 12
    )


def pcd_field_bomb() -> bytes:
    fields = b" ".join(b"f%d" % i for i in range(100_000))
    return b"FIELDS " + fields + b"\nPOINTS 1\nDATA ascii\n1\n"


def off_bomb() -> bytes:
    return b"OFF\n# a comment line\n1000000000 0 0\n0 0 0\n"


def pts_bomb() -> bytes:
    return b"1000000000\n0 0 0\n"


def wav(samples: np.ndarray, rate: int) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def wav_with_header(rate: int | None = None, channels: int | None = None) -> bytes:
    """A 4 KB WAV whose header is patched to ``rate`` Hz / ``channels`` channels."""
    x = np.random.default_rng(0).normal(0, 0.1, 2000).astype(np.float32)
    d = bytearray(wav(x, 16000))
    if rate is not None:
        struct.pack_into("<II", d, 24, rate, rate * 2)
    if channels is not None:
        struct.pack_into("<H", d, 22, channels)
    return bytes(d)


def wav_awkward_rate(seconds: float = 60.0, rate: int = 383_987) -> bytes:
    """A VALID WAV at a prime rate near the limit: reduced ratio 16000/383987 would mean a
    7.7-million-tap polyphase filter (seconds of CPU and ~1 GB) without bounded factors."""
    n = int(seconds * rate)
    x = (0.1 * np.sin(np.arange(n, dtype=np.float32) * 0.01)).astype(np.float32)
    return wav(x, rate)


def attacks() -> list[Attack]:
    """Every hostile file, by attack class (video ones only when ffmpeg is installed)."""
    lie, bomb, cost = "lying_header", "allocation_bomb", "cost_bomb"
    big = frozenset({"too_large", "truncated"})
    out = [
        Attack("ply_comment_bomb", bomb, "pointcloud", ply_bomb(), ".ply", big),
        # 10^7 vertices: what the old reader allocates fits under a benchmark's memory cap
        Attack("ply_comment_1e7", bomb, "pointcloud", ply_bomb(10**7), ".ply", big),
        Attack("ply_binary_lie", lie, "pointcloud", ply_binary_lie(), ".ply", big),
        Attack("pcd_bomb", bomb, "pointcloud", pcd_bomb(), ".pcd", big),
        Attack("pcd_field_bomb", cost, "pointcloud", pcd_field_bomb(), ".pcd", big),
        Attack("off_bomb", bomb, "pointcloud", off_bomb(), ".off", big),
        Attack("pts_bomb", bomb, "pointcloud", pts_bomb(), ".pts", big),
        Attack("wav_absurd_rate", cost, "audio", wav_with_header(rate=2_000_000_000), ".wav", big),
        Attack(
            "wav_many_channels",
            lie,
            "audio",
            wav_with_header(channels=65535),
            ".wav",
            frozenset({"too_large", "decode_error", "truncated"}),
        ),
        Attack("wav_awkward_rate", cost, "audio", wav_awkward_rate(2.0), ".wav", frozenset()),
    ]
    if have_ffmpeg():
        out += [
            Attack("mp4_lying_stts", lie, "video", mp4_lying_stts(), ".mp4", big),
            Attack("mp4_lying_duration", lie, "video", mp4_lying_duration(), ".mp4", big),
            Attack("mp4_lying_size", bomb, "video", mp4_lying_size(), ".mp4", big),
            Attack("avi_lying_frames", lie, "video", avi_lying_frames(), ".avi", big),
            Attack("mkv_lying_duration", lie, "video", mkv_lying_duration(), ".mkv", big),
            Attack("mp4_16x16", lie, "video", ffmpeg_clip(size="16x16"), ".mp4", frozenset()),
            Attack("mp4_48x48", lie, "video", ffmpeg_clip(size="48x48"), ".mp4", frozenset()),
        ]
    return out


class PeakMemory:
    """Samples the resident memory of a process tree (the driver, Ray's raylet, its
    workers and replicas) in a thread; :attr:`peak_total` and :attr:`peak_process` in bytes.

    Args:
        interval_s: Sampling period.
        root_pid: The tree's root (default: this process; with ``ray.init(address=
            "local")`` Ray's processes are its descendants).
    """

    def __init__(self, interval_s: float = 0.05, root_pid: int | None = None):
        import os
        import threading

        self.interval_s = interval_s
        self.root_pid = root_pid or os.getpid()
        self.peak_total = 0
        self.peak_process = 0
        self.peak_name = ""
        self.baseline_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[int, int, str]:
        import psutil

        try:
            root = psutil.Process(self.root_pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0, 0, ""
        total, top, name = 0, 0, ""
        for p in procs:
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            if rss > top:
                try:
                    top, name = rss, " ".join(p.cmdline()[:3])[:120]
                except psutil.Error:
                    top = rss
        return total, top, name

    def _run(self) -> None:
        while not self._stop.is_set():
            total, top, name = self.sample()
            self.peak_total = max(self.peak_total, total)
            if top > self.peak_process:
                self.peak_process, self.peak_name = top, name
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self.baseline_total = self.sample()[0]
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        """Peak total minus the total when sampling started (bytes)."""
        return max(0, self.peak_total - self.baseline_total)
