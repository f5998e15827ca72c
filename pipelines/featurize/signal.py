"""Signal featurizer: ``.npy`` (never unpickled) or CSV -> float16 (C, L).

``.npy`` arrays are (C, L) (1-D is one channel); CSV rows are time steps and columns
are channels (an optional non-numeric header row is skipped). Each channel is linearly
resampled to ``length`` and z-normalized.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.featurize import register
from pipelines.featurize.base import Featurizer, SampleError, check_finite, normalize_suffix


def resample_linear(x: np.ndarray, length: int) -> np.ndarray:
    """(C, L_in) -> (C, length) by linear interpolation over the same time span."""
    if x.shape[1] == length:
        return x
    src = np.linspace(0.0, 1.0, x.shape[1]) if x.shape[1] > 1 else np.zeros(1)
    dst = np.linspace(0.0, 1.0, length)
    return np.stack([np.interp(dst, src, ch) for ch in x])


@register("signal")
class SignalFeaturizer(Featurizer):
    """Signals -> float16 (channels, length)."""

    @dataclass
    class Config:
        """Multichannel signals -> float16 (channels, length), per-channel z-normalized.

        ``.npy`` arrays are read as (C, L) (1-D as (1, L)); CSV columns are channels,
        rows are time steps.

        Attributes:
            channels: Required channel count C (``None`` keeps whatever the file has).
            length: L after linear resampling.
            max_channels: More channels is ``too_large``.
            max_length: More time steps is ``too_large``.
        """

        channels: int | None = 3
        length: int = 128
        max_channels: int = 1024
        max_length: int = 10_000_000

    suffixes = (".npy", ".csv")

    def output_shape(self) -> tuple[int | None, int]:
        c = self.section
        return (c.channels, c.length)

    def max_output_shape(self) -> tuple[int, int]:
        c = self.section
        return (c.channels or c.max_channels, c.length)

    @classmethod
    def sniff(cls, data: bytes) -> str | None:
        if data.startswith(b"\x93NUMPY"):
            return ".npy"
        try:
            head = data[:4096].decode("utf-8")
        except UnicodeDecodeError:
            return None
        return ".csv" if "," in head or head.strip().replace(".", "").isdigit() else None

    def example(self, rng: np.random.Generator, label: int = 0) -> tuple[bytes, str]:
        """A ``.npy`` float32 (C, 200) of sines whose frequency is ``label`` + 1 cycles."""
        c = self.section.channels or 3
        t = np.linspace(0.0, 1.0, 200)
        k = int(label) % 10 + 1
        phase = rng.uniform(0, 2 * np.pi, (c, 1))
        x = np.sin(2 * np.pi * k * t[None, :] * np.arange(1, c + 1)[:, None] + phase)
        x = x + rng.normal(0, 0.05, x.shape)
        buf = io.BytesIO()
        np.save(buf, x.astype(np.float32), allow_pickle=False)
        return buf.getvalue(), ".npy"

    def from_bytes(self, data: bytes, suffix: str | None = None) -> np.ndarray:
        """Parses one ``.npy`` or CSV file and featurizes it.

        Raises:
            SampleError: ``empty``, ``decode_error``, ``bad_dtype``, ``bad_shape``,
                ``too_large``, ``non_finite``, ``unsupported_format``.
        """
        if not data:
            raise SampleError("empty", "zero-byte signal file")
        suffix = normalize_suffix(suffix, self.sniff(data) or ".csv")
        if suffix == ".npy":
            arr = self._load_npy(data)
        elif suffix == ".csv":
            arr = self._load_csv(data).T  # rows are time steps -> (C, L)
        else:
            raise SampleError("unsupported_format", f"signal suffix {suffix}")
        return self.from_array(arr)

    def _load_npy(self, data: bytes) -> np.ndarray:
        cfg = self.section
        f = io.BytesIO(data)
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        except Exception as e:  # noqa: BLE001 - malformed header
            raise SampleError("decode_error", f"bad .npy header: {e}") from e
        # Refuse before allocating anything: object arrays would need pickle.
        if dtype.hasobject or dtype.kind not in "biuf":
            raise SampleError("bad_dtype", f".npy dtype {dtype} (only numeric arrays)")
        if len(shape) not in (1, 2):
            raise SampleError("bad_shape", f".npy shape {shape}, want (L,) or (C, L)")
        n = int(np.prod(shape)) if shape else 1
        if n * dtype.itemsize > len(data):
            raise SampleError("truncated", f".npy header shape {shape} exceeds file size")
        if (len(shape) == 2 and shape[0] > cfg.max_channels) or shape[-1] > cfg.max_length:
            raise SampleError("too_large", f".npy shape {shape}")
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as e:
            raise SampleError("bad_dtype", str(e)) from e
        except Exception as e:  # noqa: BLE001
            raise SampleError("decode_error", f"{type(e).__name__}: {e}") from e

    def _load_csv(self, data: bytes) -> np.ndarray:
        cfg = self.section
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SampleError("decode_error", f"CSV is not UTF-8: {e}") from e
        rows = [r for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
        if rows and not _is_numeric_row(rows[0]):
            rows = rows[1:]  # header
        if not rows:
            raise SampleError("empty", "CSV has no numeric rows")
        if len(rows) > cfg.max_length or len(rows[0]) > cfg.max_channels:
            raise SampleError("too_large", f"CSV has {len(rows)} rows x {len(rows[0])} columns")
        width = len(rows[0])
        for i, r in enumerate(rows):
            if len(r) != width:
                raise SampleError("bad_shape", f"CSV row {i} has {len(r)} columns, not {width}")
        try:
            return np.array([[float(c) for c in r] for r in rows], dtype=np.float64)  # (L, C)
        except ValueError as e:
            raise SampleError("decode_error", f"CSV value: {e}") from e

    def from_array(self, array: np.ndarray, **_: Any) -> np.ndarray:
        """Featurizes a numeric (L,) or (C, L) array."""
        cfg = self.section
        a = np.asarray(array)
        if a.dtype.hasobject or a.dtype.kind not in "biuf":
            raise SampleError("bad_dtype", f"signal dtype {a.dtype} (only numeric arrays)")
        if a.ndim == 1:
            a = a[None, :]
        if a.ndim != 2:
            raise SampleError("bad_shape", f"signal shape {a.shape}, want (L,) or (C, L)")
        if a.shape[0] == 0 or a.shape[1] == 0:
            raise SampleError("empty", f"signal shape {a.shape}")
        if a.shape[0] > cfg.max_channels or a.shape[1] > cfg.max_length:
            raise SampleError("too_large", f"signal shape {a.shape}")
        if cfg.channels is not None and a.shape[0] != cfg.channels:
            raise SampleError("bad_shape", f"signal has {a.shape[0]} channels, want {cfg.channels}")
        a = a.astype(np.float64)
        check_finite(a, "signal")
        a = resample_linear(a, cfg.length)
        a = (a - a.mean(axis=1, keepdims=True)) / (a.std(axis=1, keepdims=True) + 1e-6)
        check_finite(a, "normalized signal")  # e.g. 1e308 overflows the variance
        return a.astype(np.float16)  # (C, L)


def _is_numeric_row(row: list[str]) -> bool:
    try:
        [float(c) for c in row]
    except ValueError:
        return False
    return True
