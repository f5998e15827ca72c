"""Signal featurizer: ``.npy`` (never unpickled), CSV or an array -> float16 (C, L).

Channels: any count C from 1 to ``max_channels`` (or exactly ``channels`` when that is set);
items of different channel counts go into one batch (collate pads the channel axis and
emits ``signal_mask`` ``(B, C)``; the encoder masks the padded channels' tokens).

Orientation (``layout``), for 2-D arrays (``.npy``, JSON arrays, in-memory arrays):

* ``channels_first``: ``(C, L)``; ``channels_last``: ``(L, C)`` (what pandas, CSV exports
  and many sensor loggers produce);
* ``auto`` (default), with B = ``channels`` when set, else ``max_channels``: when
  ``channels`` is set and exactly one axis equals it, that axis holds the channels;
  otherwise the axis whose length is <= B while the other's is > B holds them (a
  ``(C, L)`` array with ``C <= B < L``, or ``(L, C)``). When both axes are <= B the array
  is ambiguous (a recording of fewer than B steps) and refused as ``bad_shape`` naming
  ``features.signal.layout``: a silent guess would transpose the short recordings of a
  corpus. When neither axis is <= B the shorter one is taken as the channels and refused
  (``too_large`` above ``max_channels``, ``bad_shape`` when it is not ``channels``).
  Set ``layout`` when a corpus has recordings shorter than B steps (aeon and sktime
  collections are ``channels_first``).

1-D arrays are one channel. CSV rows are always time steps and columns channels (an
optional non-numeric header row is skipped; an empty cell is NaN).

Length: time steps that are NaN in every channel at the END of a recording are padding
(what aeon/sktime/``.ts`` readers produce for unequal lengths) and are trimmed; NaN or
infinity anywhere else is ``non_finite``. Then ``length_mode``: ``resample`` (linear
interpolation to ``length`` steps) or ``crop`` (the first ``length`` steps; a shorter
recording is zero-padded at the end after normalization, so padded steps are the
normalized mean; the encoder sees them as data).

Normalization (``normalize``): ``per_sample`` (default; each channel of each recording to
zero mean and unit variance: the offset and scale are lost), ``dataset`` (per channel
index c, the mean/std of channel c over the TRAINING split's recordings, computed by
:meth:`SignalFeaturizer.fit` in prepare, stored in ``stats`` and applied by
:meth:`SignalFeaturizer.finalize`; with mixed channel counts, channel c's statistics come
from the recordings that have a channel c; channel indices beyond the fitted ones are left
unscaled; values are clipped to the float16 range), ``none`` (raw values; a value outside
the float16 range is ``non_finite``).

Stage 1 (:meth:`~SignalFeaturizer.decode`) gives float32 ``(C, L')`` (``L' = length``, or
fewer steps in crop mode), normalized unless ``normalize=dataset``; stage 2
(:meth:`~SignalFeaturizer.finalize`) applies the dataset statistics, pads and casts to
float16 ``(C, length)``.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.featurize import register
from pipelines.featurize.base import (
    Featurizer,
    SampleError,
    Written,
    check_finite,
    normalize_suffix,
    window_spans,
)

LAYOUTS = ("auto", "channels_first", "channels_last")
LENGTH_MODES = ("resample", "crop")
NORMALIZE = ("per_sample", "dataset", "none")
_F16_MAX = float(np.finfo(np.float16).max)


def resample_linear(x: np.ndarray, length: int) -> np.ndarray:
    """(C, L_in) -> (C, length) by linear interpolation over the same time span."""
    if x.shape[1] == length:
        return x
    src = np.linspace(0.0, 1.0, x.shape[1]) if x.shape[1] > 1 else np.zeros(1)
    dst = np.linspace(0.0, 1.0, length)
    return np.stack([np.interp(dst, src, ch) for ch in x])


def trim_nan_padding(x: np.ndarray) -> np.ndarray:
    """(C, L) -> (C, L') without the trailing steps that are NaN in every channel.

    Raises:
        SampleError: ``empty`` when every step is padding; ``non_finite`` when NaN or
            infinity remains inside the recording.
    """
    if x.dtype.kind not in "fc" or np.isfinite(x).all():
        return x
    pad = np.isnan(x).all(axis=0)  # (L,)
    keep = len(pad) - int(np.argmin(pad[::-1])) if not pad.all() else 0
    if keep == 0:
        raise SampleError("empty", "every step of the signal is NaN")
    x = x[:, :keep]
    if not np.isfinite(x).all():
        raise SampleError(
            "non_finite",
            "signal contains NaN or infinite values inside the recording "
            "(only trailing steps that are NaN in every channel are trimmed as padding)",
        )
    return x


@register("signal")
class SignalFeaturizer(Featurizer):
    """Signals -> float16 (C, length), C in 1..max_channels (see the module docstring)."""

    @dataclass
    class Config:
        """The ``signal`` section of ``features:`` (rules: the module docstring).

        Attributes:
            channels: Exact channel count C every recording must have; ``None``: any
                count from 1 to ``max_channels`` (mixed counts share one model and batch).
            max_channels: The most channels of one recording. With ``channels: null`` it
                also sizes the model's channel-embedding table (the featurizer's
                ``max_output_shape()[0]``), so serving must not override it then.
            length: L of a featurized item (time steps after resampling or cropping).
            max_length: More raw time steps is ``too_large``.
            length_mode: ``resample`` (linear, to ``length``) or ``crop`` (first
                ``length`` steps, zero-padded at the end when shorter).
            layout: ``auto``, ``channels_first`` ``(C, L)`` or ``channels_last``
                ``(L, C)``, for 2-D arrays (CSV rows are always time steps).
            normalize: ``per_sample``, ``dataset`` (per-channel-index statistics of
                the training split, see ``stats``) or ``none``.
            stats: ``{mean: [...], std: [...]}`` per channel index, filled by ``fit``
                from the training split when ``normalize: dataset``.
        """

        channels: int | None = 3
        max_channels: int = 64
        length: int = 128
        max_length: int = 10_000_000
        length_mode: str = "resample"
        layout: str = "auto"
        normalize: str = "per_sample"
        stats: dict[str, list[float]] = field(default_factory=dict)

        def __post_init__(self) -> None:
            if self.max_channels < 1 or self.length < 1 or self.max_length < 1:
                raise ValueError("max_channels, length and max_length must be >= 1")
            if self.channels is not None and not 1 <= self.channels <= self.max_channels:
                raise ValueError(
                    f"channels={self.channels} must be in 1..max_channels={self.max_channels} "
                    "(or null for any count)"
                )
            for key, value, allowed in (
                ("length_mode", self.length_mode, LENGTH_MODES),
                ("layout", self.layout, LAYOUTS),
                ("normalize", self.normalize, NORMALIZE),
            ):
                if value not in allowed:
                    raise ValueError(f"{key} must be one of {list(allowed)}, got {value!r}")
            if self.stats:
                mean, std = self.stats.get("mean"), self.stats.get("std")
                if set(self.stats) != {"mean", "std"} or len(mean) != len(std):
                    raise ValueError("stats must be {mean: [...], std: [...]} of equal length")
                if not all(math.isfinite(m) for m in mean) or not all(
                    math.isfinite(s) and s > 0 for s in std
                ):
                    raise ValueError("stats: means must be finite and stds finite and > 0")

        @property
        def channel_bound(self) -> int:
            """The most channels of a featurized item (the model's channel table size)."""
            return self.channels if self.channels is not None else self.max_channels

    suffixes = (".npy", ".csv")
    windowed = True
    #: Stage 1 keeps float32: un-normalized values (``dataset``/``none``) need the range.
    decoded_dtype = "float32"

    # -- shape ----------------------------------------------------------------------
    def output_shape(self) -> tuple[int | None, int]:
        c = self.section
        return (c.channels, c.length)

    def max_output_shape(self) -> tuple[int, int]:
        c = self.section
        return (c.channel_bound, c.length)

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
        """A ``.npy`` float32 (C, 200) of sines whose frequency is ``label`` + 1 cycles
        (longer than ``max_channels`` steps, so that ``layout: auto`` reads it)."""
        c = self.section.channels or min(3, self.section.max_channels)
        t = np.linspace(0.0, 1.0, max(200, self.section.channel_bound + 1))
        k = int(label) % 10 + 1
        phase = rng.uniform(0, 2 * np.pi, (c, 1))
        x = np.sin(2 * np.pi * k * t[None, :] * np.arange(1, c + 1)[:, None] + phase)
        x = x + rng.normal(0, 0.05, x.shape)
        buf = io.BytesIO()
        np.save(buf, x.astype(np.float32), allow_pickle=False)
        return buf.getvalue(), ".npy"

    # -- orientation and limits --------------------------------------------------------
    def _check_channels(self, c: int, shape: tuple[int, ...]) -> None:
        cfg = self.section
        if c > cfg.max_channels:
            raise SampleError(
                "too_large", f"signal shape {shape}: {c} channels > max_channels={cfg.max_channels}"
            )
        if cfg.channels is not None and c != cfg.channels:
            raise SampleError(
                "bad_shape",
                f"signal shape {shape}: {c} channels, want {cfg.channels} "
                "(features.signal.channels; null takes any count up to max_channels)",
            )

    def channels_axis(self, shape: tuple[int, ...], layout: str | None = None) -> int:
        """The channel axis (0 or 1) of a 2-D ``shape`` under ``layout`` (default: the
        configured one), checked against the channel limits.

        Raises:
            SampleError: ``bad_shape`` (ambiguous, or not ``channels``), ``too_large``.
        """
        cfg = self.section
        layout = layout or cfg.layout
        a, b = int(shape[0]), int(shape[1])
        if layout == "channels_first":
            axis = 0
        elif layout == "channels_last":
            axis = 1
        elif cfg.channels is not None and (a == cfg.channels) != (b == cfg.channels):
            axis = 0 if a == cfg.channels else 1
        else:
            bound = cfg.channel_bound
            if (a <= bound) != (b <= bound):
                axis = 0 if a <= bound else 1
            elif a <= bound:
                raise SampleError(
                    "bad_shape",
                    f"signal shape {tuple(shape)} is ambiguous with layout=auto (both axes "
                    f"<= {bound} channels); set features.signal.layout to channels_first "
                    "or channels_last",
                )
            else:
                axis = 0 if a < b else 1
        if (a, b)[1 - axis] > cfg.max_length:  # limits first: an oversized input is too_large
            raise SampleError(
                "too_large", f"signal shape {tuple(shape)}: more than {cfg.max_length} steps"
            )
        self._check_channels((a, b)[axis], tuple(shape))
        return axis

    # -- stage 1 -----------------------------------------------------------------------
    def from_bytes(self, data: bytes, suffix: str | None = None) -> np.ndarray:
        """Parses one ``.npy`` or CSV file and featurizes it (stage 1).

        Raises:
            SampleError: ``empty``, ``decode_error``, ``bad_dtype``, ``bad_shape``,
                ``too_large``, ``non_finite``, ``truncated``, ``unsupported_format``.
        """
        if not data:
            raise SampleError("empty", "zero-byte signal file")
        suffix = normalize_suffix(suffix, self.sniff(data) or ".csv")
        if suffix == ".npy":
            arr, layout = self._load_npy(data), None
        elif suffix == ".csv":
            arr, layout = self._load_csv(data), "channels_last"  # rows are time steps
        else:
            raise SampleError("unsupported_format", f"signal suffix {suffix}")
        return self.from_array(arr, layout=layout)

    def _load_npy(self, data: bytes) -> np.ndarray:
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
            raise SampleError("bad_shape", f".npy shape {shape}, want (L,), (C, L) or (L, C)")
        n = int(np.prod(shape)) if shape else 1
        if n * dtype.itemsize > len(data):
            raise SampleError("truncated", f".npy header shape {shape} exceeds file size")
        if len(shape) == 1:
            if shape[0] > self.section.max_length:
                raise SampleError("too_large", f".npy shape {shape}")
        elif 0 not in shape:
            self.channels_axis(shape)  # limits from the header, before reading the data
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
            return np.array([[_cell(c) for c in r] for r in rows], dtype=np.float64)  # (L, C)
        except ValueError as e:
            raise SampleError("decode_error", f"CSV value: {e}") from e

    def from_value(self, value: Any) -> np.ndarray:
        """Nested lists (a JSON array; ``None`` is NaN) -> :meth:`from_array`."""
        if isinstance(value, list | tuple):
            try:
                arr = np.array(value, dtype=np.float64)
            except (TypeError, ValueError) as e:
                raise SampleError("bad_shape", f"signal lists are not rectangular: {e}") from None
            return self.from_array(arr)
        return super().from_value(value)

    def from_array(self, array: np.ndarray, layout: str | None = None, **_: Any) -> np.ndarray:
        """Featurizes a numeric (L,), (C, L) or (L, C) array (stage 1: float32 (C, L')).

        Args:
            array: The recording.
            layout: Overrides the configured ``layout`` (CSV: ``channels_last``).
        """
        return self._fit_length(self._oriented(array, layout))

    def decode_windows(
        self,
        raw: Any,
        suffix: str | None = None,
        *,
        window_s: float,
        hop_s: float,
        rate_hz: float | None = None,
    ) -> list[tuple[float | None, float | None, Any]]:
        """The recording cut into windows of time (:func:`window_spans`; ``rate_hz`` steps
        per second, default 1 so that seconds are steps), each resampled/cropped and
        normalized as a recording of that length."""
        if raw is None:
            raise SampleError("empty", "no data")
        layout = None
        if isinstance(raw, bytes | bytearray | memoryview):
            data = bytes(raw)
            if not data:
                raise SampleError("empty", "zero-byte signal file")
            suffix = normalize_suffix(suffix, self.sniff(data) or ".csv")
            if suffix == ".npy":
                arr = self._load_npy(data)
            elif suffix == ".csv":
                arr, layout = self._load_csv(data), "channels_last"
            else:
                raise SampleError("unsupported_format", f"signal suffix {suffix}")
        elif isinstance(raw, list | tuple):
            try:
                arr = np.array(raw, dtype=np.float64)
            except (TypeError, ValueError) as e:
                raise SampleError("bad_shape", f"signal lists are not rectangular: {e}") from None
        else:
            arr = np.asarray(raw)
        a = self._oriented(arr, layout)  # (C, L)
        rate = float(rate_hz or 1.0)
        out: list[tuple[float | None, float | None, Any]] = []
        for s, e in window_spans(a.shape[1] / rate, window_s, hop_s):
            lo = int(round(s * rate))
            hi = max(int(round(e * rate)), lo + 1)
            out.append((s, e, self._fit_length(a[:, lo:hi])))
        return out

    def _oriented(self, array: Any, layout: str | None) -> np.ndarray:
        """A numeric array -> float64 ``(C, L)``: orientation, limits, NaN end padding."""
        a = np.asarray(array)
        if a.dtype.hasobject or a.dtype.kind not in "biuf":
            raise SampleError("bad_dtype", f"signal dtype {a.dtype} (only numeric arrays)")
        if a.ndim == 1:  # one channel, however short
            a, layout = a[None, :], "channels_first"
        if a.ndim != 2:
            raise SampleError("bad_shape", f"signal shape {a.shape}, want (L,), (C, L) or (L, C)")
        if a.shape[0] == 0 or a.shape[1] == 0:
            raise SampleError("empty", f"signal shape {a.shape}")
        if self.channels_axis(a.shape, layout) == 1:
            a = a.T
        steps = a.shape[1]
        a = trim_nan_padding(a.astype(np.float64))  # (C, L)
        self._trimmed = steps - a.shape[1]
        check_finite(a, "signal")
        return a

    def _fit_length(self, a: np.ndarray) -> np.ndarray:
        """Oriented float64 ``(C, L)`` -> stage-1 float32 ``(C, L')``: length and
        normalization as configured."""
        cfg = self.section
        if cfg.length_mode == "resample":
            a = resample_linear(a, cfg.length)
        else:
            a = a[:, : cfg.length]
        if cfg.normalize == "per_sample":
            a = (a - a.mean(axis=1, keepdims=True)) / (a.std(axis=1, keepdims=True) + 1e-6)
            check_finite(a, "normalized signal")  # e.g. 1e308 overflows the variance
        elif cfg.normalize == "none" and np.abs(a).max() > _F16_MAX:
            raise SampleError(
                "non_finite",
                f"signal value {np.abs(a).max():.3g} overflows float16 with normalize=none "
                "(use per_sample or dataset)",
            )
        a = a.astype(np.float32)
        check_finite(a, "signal as float32")
        return a

    def decode_noted(self, raw: Any, suffix: str | None = None) -> tuple[Any, dict[str, int]]:
        """:meth:`decode`, noting trimmed NaN end padding (``stats.json`` ``cleaned``:
        ``nan_padding_trimmed`` recordings, ``nan_padding_steps`` steps)."""
        self._trimmed = 0
        item = self.decode(raw, suffix)
        if not self._trimmed:
            return item, {}
        return item, {"nan_padding_trimmed": 1, "nan_padding_steps": int(self._trimmed)}

    # -- statistics from the training split, and stage 2 ---------------------------------
    @classmethod
    def is_fitted(cls, section: Any = None) -> bool:
        """Prepare fits statistics only for ``normalize: dataset``."""
        return section is None or getattr(section, "normalize", None) == "dataset"

    def fit(self, items: list[np.ndarray]) -> dict[str, Any] | None:
        """Per-channel-index mean/std over every step of the TRAIN split's decoded items
        (channel c: the recordings that have a channel c), for ``normalize: dataset``.

        Returns:
            ``{"stats": {"mean": [...], "std": [...]}}`` (one entry per channel index up to
            the most channels seen; a constant channel gets std 1), or None.
        """
        if self.section.normalize != "dataset" or not items:
            return None
        n_ch = max(int(np.shape(x)[0]) for x in items)
        count = np.zeros(n_ch)
        total = np.zeros(n_ch)
        total_sq = np.zeros(n_ch)
        for x in items:
            a = np.asarray(x, dtype=np.float64)
            c = a.shape[0]
            count[:c] += a.shape[1]
            total[:c] += a.sum(axis=1)
            total_sq[:c] += np.square(a).sum(axis=1)
        mean = total / np.maximum(count, 1)
        var = np.maximum(total_sq / np.maximum(count, 1) - mean**2, 0.0)
        std = np.sqrt(var)
        std = np.where(std > 1e-8 * np.maximum(1.0, np.abs(mean)), std, 1.0)
        return {"stats": {"mean": mean.tolist(), "std": std.tolist()}}

    def finalize(self, item: np.ndarray) -> np.ndarray:
        """Stage 2: dataset statistics (``normalize: dataset``), end padding to
        ``length`` (crop mode), float16 ``(C, length)``."""
        cfg = self.section
        x = np.asarray(item, dtype=np.float32)
        if cfg.normalize == "dataset" and cfg.stats:
            k = min(x.shape[0], len(cfg.stats["mean"]))
            mean = np.asarray(cfg.stats["mean"][:k], dtype=np.float32)[:, None]
            std = np.asarray(cfg.stats["std"][:k], dtype=np.float32)[:, None]
            x = x.copy()
            x[:k] = (x[:k] - mean) / std
        if x.shape[1] < cfg.length:
            x = np.pad(x, ((0, 0), (0, cfg.length - x.shape[1])))
        return np.clip(x, -_F16_MAX, _F16_MAX).astype(np.float16)

    # -- writer (the inverse of featurization) ------------------------------------------
    write_formats = ("npy", "csv")

    def write(self, item: np.ndarray, fmt: str | None = None) -> Written:
        """A featurized (C, L) signal -> ``.npy`` (float32 (C, L), no pickle) or ``.csv``
        (one row per time step, a ``ch0,ch1,...`` header). ``normalize: dataset``
        statistics are undone, so the file holds values in the recording's units.

        Raises:
            SampleError: ``unsupported_format``, ``bad_shape``, ``non_finite``.
        """
        fmt = fmt or "npy"
        if fmt not in self.write_formats:
            raise SampleError("unsupported_format", f"signal writer formats: {self.write_formats}")
        x = np.asarray(item, dtype=np.float32)
        if x.ndim != 2:
            raise SampleError("bad_shape", f"signal item shape {x.shape}, want (C, L)")
        check_finite(x, "signal")
        cfg = self.section
        if cfg.normalize == "dataset" and cfg.stats:
            k = min(x.shape[0], len(cfg.stats["mean"]))
            x = x.copy()
            x[:k] = (
                x[:k] * np.asarray(cfg.stats["std"][:k], np.float32)[:, None]
                + np.asarray(cfg.stats["mean"][:k], np.float32)[:, None]
            )
        if fmt == "npy":
            buf = io.BytesIO()
            np.save(buf, x, allow_pickle=False)
            return Written(buf.getvalue(), "application/x-npy", ".npy")
        head = ",".join(f"ch{i}" for i in range(x.shape[0]))
        rows = "\n".join(",".join(f"{v:.6g}" for v in row) for row in x.T)
        return Written(f"{head}\n{rows}\n".encode(), "text/csv", ".csv")


def _cell(c: str) -> float:
    return float(c) if c.strip() else math.nan


def _is_numeric_row(row: list[str]) -> bool:
    try:
        [_cell(c) for c in row]
    except ValueError:
        return False
    return any(c.strip() for c in row)
