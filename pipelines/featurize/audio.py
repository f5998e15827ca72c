"""Audio featurizer: WAV/FLAC/OGG (soundfile) -> float16 (T, F) log-mel or MFCC frames.

Any sample rate and channel count is accepted: channels are averaged to mono and the
signal is resampled (polyphase, scipy) to ``sample_rate``. Features use numpy/scipy only
(no torchaudio): Hann window ``win_ms``, hop ``hop_ms``, power spectrum, HTK mel
filterbank, log; MFCC adds an orthonormal DCT-II. Each bin is mean/variance normalized
over the utterance, and clips longer than ``max_frames`` are centre-cropped.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from math import ceil, floor
from typing import Any

import numpy as np
import scipy.fft
import soundfile as sf

from pipelines.featurize import register
from pipelines.featurize.base import (
    Featurizer,
    SampleError,
    Written,
    check_finite,
    window_spans,
)


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + f / 700.0)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


@lru_cache(maxsize=16)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Triangular HTK-mel filters, float32 (n_mels, n_fft // 2 + 1)."""
    freqs = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(0.0, _hz_to_mel(np.array(sample_rate / 2.0)), n_mels + 2))
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None, :] - lower) / np.maximum(center - lower, 1e-9)
    down = (upper - freqs[None, :]) / np.maximum(upper - center, 1e-9)
    return np.maximum(0.0, np.minimum(up, down)).astype(np.float32)


#: Largest up/down factor of the polyphase resampler. A rate pair whose reduced ratio needs
#: more (16001 Hz -> 16000 Hz: 16000/16001, a 320,000-tap filter) is resampled with the
#: nearest ratio within it (here 1/1: a 0.006 % rate error), so the filter, its cache and
#: the work per sample stay bounded whatever rate a header claims.
MAX_RESAMPLE_FACTOR = 1000


@lru_cache(maxsize=32)
def _polyphase_filter(up: int, down: int) -> np.ndarray:
    # The filter resample_poly would design on every call (Kaiser, beta 5); cached. At most
    # 2 * 10 * MAX_RESAMPLE_FACTOR + 1 taps (160 KB), so the cache is at most ~5 MB.
    import scipy.signal  # ~1 s to import: loaded by the first audio item (or warm_up)

    max_rate = max(up, down)
    return scipy.signal.firwin(2 * 10 * max_rate + 1, 1.0 / max_rate, window=("kaiser", 5.0))


@lru_cache(maxsize=8)
def _hann(win: int) -> np.ndarray:
    import scipy.signal

    return scipy.signal.get_window("hann", win, fftbins=True).astype(np.float32)


def resample_factors(sr_in: int, sr_out: int) -> tuple[int, int]:
    """(up, down) of the polyphase resampler, both <= :data:`MAX_RESAMPLE_FACTOR`."""
    frac = Fraction(int(sr_out), int(sr_in))
    if max(frac.numerator, frac.denominator) > MAX_RESAMPLE_FACTOR:
        frac = frac.limit_denominator(MAX_RESAMPLE_FACTOR)
        while frac.numerator > MAX_RESAMPLE_FACTOR:  # extreme upsampling
            frac = Fraction(MAX_RESAMPLE_FACTOR, max(1, round(MAX_RESAMPLE_FACTOR / frac)))
    return frac.numerator, frac.denominator


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Polyphase resampling of a 1-D float signal from ``sr_in`` to ``sr_out`` Hz."""
    up, down = resample_factors(sr_in, sr_out)
    if up == down:
        return x
    import scipy.signal

    return scipy.signal.resample_poly(x, up, down, window=_polyphase_filter(up, down)).astype(
        np.float32
    )


def wav_truncation(data: bytes) -> str | None:
    """For RIFF/WAVE bytes, a message if the header promises more bytes than exist."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    riff_size = struct.unpack("<I", data[4:8])[0]
    if riff_size != 0xFFFFFFFF and riff_size + 8 > len(data):
        return f"RIFF header declares {riff_size + 8} bytes, file has {len(data)}"
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        if cid == b"data":
            if size != 0xFFFFFFFF and pos + 8 + size > len(data):
                return f"data chunk declares {size} bytes, {len(data) - pos - 8} present"
            return None
        pos += 8 + size + (size & 1)
    return "no data chunk"


@register("audio")
class AudioFeaturizer(Featurizer):
    """Audio -> float16 (T, F), T <= ``max_frames``, F = n_mels (logmel) or n_mfcc."""

    @dataclass
    class Config:
        """Audio -> float16 (T, F) log-mel (or MFCC) frames.

        Attributes:
            sample_rate: Rate everything is resampled to (Hz).
            features: ``logmel`` or ``mfcc``.
            n_mels: Mel bins (F for ``logmel``).
            n_mfcc: Cepstral coefficients kept (F for ``mfcc``).
            win_ms: Analysis window length in milliseconds.
            hop_ms: Hop between frames in milliseconds.
            max_frames: T is at most this; longer clips are centre-cropped.
            max_seconds: Clips longer than this are ``too_large`` (checked from the header).
            normalize: Per-utterance mean/variance normalization of each feature bin.
            max_channels: Files with more channels are ``too_large`` (from the header).
            min_sample_rate: Files at a lower rate (Hz) are ``decode_error``.
            max_sample_rate: Files at a higher rate (Hz) are ``too_large``. Whatever the
                clip's length, only the centre window that ``max_frames`` keeps is read and
                resampled, so the work per clip is bounded by ``max_frames`` and this rate.
        """

        sample_rate: int = 16_000
        features: str = "logmel"
        n_mels: int = 40
        n_mfcc: int = 20
        win_ms: float = 25.0
        hop_ms: float = 10.0
        max_frames: int = 128
        max_seconds: float = 600.0
        normalize: bool = True
        max_channels: int = 64
        min_sample_rate: int = 1000
        max_sample_rate: int = 384_000

        def __post_init__(self) -> None:
            if self.features not in ("logmel", "mfcc"):
                raise ValueError(f"features must be 'logmel' or 'mfcc', got {self.features!r}")

        @property
        def num_features(self) -> int:
            return self.n_mels if self.features == "logmel" else self.n_mfcc

    suffixes = (".wav", ".flac", ".ogg", ".aiff", ".aif")
    windowed = True

    def warm_up(self) -> None:
        import scipy.signal  # noqa: F401 - ~1 s; imported lazily so other modalities skip it

    def output_shape(self) -> tuple[int | None, int]:
        return (None, self.section.num_features)

    def max_output_shape(self) -> tuple[int, int]:
        return (self.section.max_frames, self.section.num_features)

    @classmethod
    def sniff(cls, data: bytes) -> str | None:
        if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
            return ".wav"
        if data[:4] == b"fLaC":
            return ".flac"
        if data[:4] == b"OggS":
            return ".ogg"
        if data[:4] == b"FORM" and data[8:12] in (b"AIFF", b"AIFC"):
            return ".aiff"
        return None

    def example(self, rng: np.random.Generator, label: int = 0) -> tuple[bytes, str]:
        """A 0.4 s 16-bit WAV tone whose pitch is set by ``label`` (220 Hz * 2^(label/4))."""
        sr = 16_000
        t = np.arange(int(0.4 * sr)) / sr
        f0 = 220.0 * 2.0 ** ((int(label) % 10) / 4.0) * rng.uniform(0.99, 1.01)
        x = 0.4 * np.sin(2 * np.pi * f0 * t + rng.uniform(0, 2 * np.pi))
        x = x * np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.02)  # 20 ms fades
        x = x + rng.normal(0, 0.01, x.shape)
        buf = io.BytesIO()
        sf.write(buf, x.astype(np.float32), sr, format="WAV", subtype="PCM_16")
        return buf.getvalue(), ".wav"

    def from_bytes(self, data: bytes, suffix: str | None = None) -> np.ndarray:
        """Decodes one audio file and featurizes it (only the centre window that
        ``max_frames`` keeps is read and resampled).

        Raises:
            SampleError: ``empty``, ``truncated``, ``decode_error``, ``too_large``,
                ``non_finite``.
        """
        with self._open(data) as f:
            sr = self._check(f.frames, f.samplerate, f.channels)
            start, stop, skip = self._window(f.frames, sr)
            x = self._read_frames(f, start, stop)
        return self._features(x, sr, skip)

    def _read(self, data: bytes) -> tuple[np.ndarray, int]:
        """Audio file bytes -> the whole ``(float32 (N, C) waveform, sample rate)``, header
        claims checked against the limits first (for windowing long media)."""
        with self._open(data) as f:
            sr = self._check(f.frames, f.samplerate, f.channels)
            return self._read_frames(f, 0, f.frames), sr

    @staticmethod
    def _open(data: bytes) -> sf.SoundFile:
        if not data:
            raise SampleError("empty", "zero-byte audio file")
        trunc = wav_truncation(data)
        if trunc is not None:
            raise SampleError("truncated", trunc)
        try:
            return sf.SoundFile(io.BytesIO(data))
        except Exception as e:  # noqa: BLE001 - libsndfile refuses garbage with many errors
            raise SampleError("decode_error", str(e)) from e

    @staticmethod
    def _read_frames(f: sf.SoundFile, start: int, stop: int) -> np.ndarray:
        try:
            if start:
                f.seek(start)
            x = f.read(stop - start, dtype="float32", always_2d=True)  # (N, C)
        except Exception as e:  # noqa: BLE001
            msg = str(e)
            reason = "truncated" if "sync" in msg or "truncat" in msg else "decode_error"
            raise SampleError(reason, msg) from e
        if len(x) < stop - start:
            raise SampleError("truncated", f"read {len(x)} of {stop - start} frames")
        return x

    def _check(self, frames: int, rate: float, channels: int) -> int:
        """Header claims against the limits, before any sample is read; returns the rate."""
        cfg = self.section
        if channels <= 0 or not rate > 0:
            raise SampleError("decode_error", f"rate={rate} channels={channels}")
        if channels > cfg.max_channels:
            raise SampleError("too_large", f"{channels} channels > max_channels={cfg.max_channels}")
        if rate > cfg.max_sample_rate:
            raise SampleError(
                "too_large", f"sample rate {rate} Hz > max_sample_rate={cfg.max_sample_rate}"
            )
        if rate < cfg.min_sample_rate:
            raise SampleError(
                "decode_error", f"sample rate {rate} Hz < min_sample_rate={cfg.min_sample_rate}"
            )
        if frames <= 0:
            raise SampleError("empty", "no audio frames")
        seconds = frames / rate
        if seconds > cfg.max_seconds:
            raise SampleError(
                "too_large", f"{seconds:.1f} s x {channels} ch > max_seconds={cfg.max_seconds}"
            )
        return int(rate)

    def _hop_win(self) -> tuple[int, int]:
        cfg = self.section
        win = max(1, int(round(cfg.sample_rate * cfg.win_ms / 1000.0)))
        hop = max(1, int(round(cfg.sample_rate * cfg.hop_ms / 1000.0)))
        return hop, win

    def _window(self, n_in: int, sr: int) -> tuple[int, int, int]:
        """The input samples ``[start, stop)`` that the centre crop to ``max_frames`` needs,
        with a margin for the resampling filter, and the output samples to skip after
        resampling them; ``(0, n_in, 0)`` when the whole clip is kept."""
        cfg = self.section
        hop, win = self._hop_win()
        up, down = resample_factors(sr, cfg.sample_rate)
        ratio = down / up  # input samples per output sample
        n_out = ceil(n_in / ratio)
        n_frames = 1 + (max(n_out, win) - win) // hop
        if n_frames <= cfg.max_frames:
            return 0, n_in, 0
        need = (cfg.max_frames - 1) * hop + win
        start_out = ((n_frames - cfg.max_frames) // 2) * hop
        margin = 64 + ceil(10 * max(ratio, 1.0))  # > the filter's half-length (input samples)
        # ``start`` on a multiple of ``down``: output sample j of the window's resampling is
        # then exactly output sample j + start * up / down of the whole clip's.
        start = max(0, (floor(start_out * ratio) - margin) // down * down)
        stop = min(n_in, ceil((start_out + need) * ratio) + margin)
        return start, stop, start_out - start * up // down

    def from_array(self, array: np.ndarray, sample_rate: int | None = None, **_: Any) -> np.ndarray:
        """Featurizes a waveform (N,) or (N, C); ints are scaled to [-1, 1].

        Args:
            array: Samples, time first.
            sample_rate: Its rate (defaults to ``section.sample_rate``).
        """
        a, sr = self._waveform(array, sample_rate)
        start, stop, skip = self._window(a.shape[0], sr)
        return self._features(a[start:stop], sr, skip)

    def _waveform(self, array: np.ndarray, sample_rate: float | None) -> tuple[np.ndarray, int]:
        """A waveform array -> ``(float32 (N, C), rate)``, dtype/shape/limits checked."""
        a = np.asarray(array)
        if a.dtype.kind == "i":
            a = a.astype(np.float32) / float(np.iinfo(a.dtype).max)
        elif a.dtype.kind == "u":
            info = np.iinfo(a.dtype)
            a = (a.astype(np.float32) - (info.max + 1) / 2) / ((info.max + 1) / 2)
        elif a.dtype.kind != "f":
            raise SampleError("bad_dtype", f"audio array dtype {a.dtype}")
        if a.ndim == 1:
            a = a[:, None]
        if a.ndim != 2:
            raise SampleError("bad_shape", f"audio array shape {a.shape}")
        if a.shape[0] == 0:
            raise SampleError("empty", "no audio samples")
        sr = self._check(a.shape[0], sample_rate or self.section.sample_rate, a.shape[1])
        return a.astype(np.float32, copy=False), sr

    def decode_windows(
        self,
        raw: Any,
        suffix: str | None = None,
        *,
        window_s: float,
        hop_s: float,
        rate_hz: float | None = None,
    ) -> list[tuple[float | None, float | None, Any]]:
        """The waveform cut into windows (:func:`window_spans`), each featurized as a clip
        of that length (``rate_hz``: the rate of an array input)."""
        if raw is None:
            raise SampleError("empty", "no data")
        if isinstance(raw, bytes | bytearray | memoryview):
            x, sr = self._read(bytes(raw))
        elif isinstance(raw, np.ndarray):
            x, sr = self._waveform(raw, rate_hz)
        else:
            return super().decode_windows(raw, suffix, window_s=window_s, hop_s=hop_s)
        out: list[tuple[float | None, float | None, Any]] = []
        for s, e in window_spans(len(x) / sr, window_s, hop_s):
            seg = x[int(round(s * sr)) : max(int(round(e * sr)), int(round(s * sr)) + 1)]
            start, stop, skip = self._window(len(seg), sr)
            out.append((s, e, self._features(seg[start:stop], sr, skip)))
        return out

    def _features(self, x: np.ndarray, sr: int, skip: int = 0) -> np.ndarray:
        """(N, C) float32 waveform at ``sr`` -> float16 (T, F) features; ``skip``: output
        samples before the kept window (see :meth:`_window`)."""
        cfg = self.section
        check_finite(x, "audio")
        mono = x.mean(axis=1)
        mono = resample(mono, sr, cfg.sample_rate)
        hop, win = self._hop_win()
        if skip:
            mono = mono[skip : skip + (cfg.max_frames - 1) * hop + win]
        n_fft = 1 << (win - 1).bit_length()
        if len(mono) < win:
            mono = np.pad(mono, (0, win - len(mono)))
        n_frames = 1 + (len(mono) - win) // hop
        if n_frames > cfg.max_frames:
            # Centre crop in the time domain before the FFT: cost independent of length.
            start = ((n_frames - cfg.max_frames) // 2) * hop
            mono = mono[start : start + (cfg.max_frames - 1) * hop + win]
            n_frames = cfg.max_frames
        frames = np.lib.stride_tricks.sliding_window_view(mono, win)[::hop][:n_frames]  # (T, win)
        window = _hann(win)
        power = np.abs(np.fft.rfft(frames * window, n=n_fft, axis=1)) ** 2  # (T, n_fft/2+1)
        fb = mel_filterbank(cfg.sample_rate, n_fft, cfg.n_mels)
        feats = np.log(power.astype(np.float32) @ fb.T + 1e-6)  # (T, n_mels)
        if cfg.features == "mfcc":
            feats = scipy.fft.dct(feats, type=2, norm="ortho", axis=1)[:, : cfg.n_mfcc]
        if cfg.normalize:
            feats = (feats - feats.mean(axis=0, keepdims=True)) / (
                feats.std(axis=0, keepdims=True) + 1e-5
            )
        check_finite(feats, "audio features")
        return feats.astype(np.float16)

    # -- writer (the inverse of featurization) ------------------------------------------
    write_formats = ("wav",)
    #: Log-mel level of a written clip: the featurizer's per-bin normalization removed the
    #: level and spectral tilt, so they are put back as a fixed speech-like envelope (a
    #: re-featurized file normalizes them away again, so they cannot change what it means).
    write_level_std: float = 2.0
    write_griffin_lim_iters: int = 48

    def write(self, item: np.ndarray, fmt: str | None = None, *, seed: int = 0) -> Written:
        """Featurized log-mel frames (T, n_mels) -> a 16-bit mono WAV at ``sample_rate``.

        The mel power is mapped back to a linear spectrogram by non-negative least squares
        against the featurizer's own filterbank (multiplicative updates), and its phase
        rebuilt by fast Griffin-Lim (Perraudin et al. 2013) with ``torch.stft``/``istft``
        using the featurizer's window and hop, so re-featurizing the WAV gives back frames
        close to ``item``.

        Raises:
            SampleError: ``unsupported_format`` (``fmt`` not ``wav``, or MFCC features,
                which drop the information a waveform needs), ``bad_shape``, ``non_finite``.
        """
        import torch

        cfg = self.section
        if (fmt or "wav") != "wav":
            raise SampleError("unsupported_format", f"audio writer formats: {self.write_formats}")
        if cfg.features != "logmel":
            raise SampleError("unsupported_format", "only log-mel features can be written as audio")
        feats = np.asarray(item, dtype=np.float32)
        if feats.ndim != 2 or feats.shape[1] != cfg.n_mels or feats.shape[0] < 1:
            raise SampleError(
                "bad_shape", f"audio item shape {feats.shape}, want (T, {cfg.n_mels})"
            )
        check_finite(feats, "audio features")
        sr = cfg.sample_rate
        win = max(1, int(round(sr * cfg.win_ms / 1000.0)))
        hop = max(1, int(round(sr * cfg.hop_ms / 1000.0)))
        n_fft = 1 << (win - 1).bit_length()
        fb = torch.from_numpy(mel_filterbank(sr, n_fft, cfg.n_mels)).double()  # (M, K)
        logmel = torch.from_numpy(feats).double()  # (T, M)
        if cfg.normalize:
            tilt = torch.linspace(0.0, -4.0, cfg.n_mels, dtype=torch.float64)
            logmel = logmel * self.write_level_std + tilt - 4.0
        mel = logmel.exp().T  # (M, T) mel power
        # Non-negative least squares  min ||fb @ S - mel||, S >= 0 (Lee-Seung updates).
        spec = (fb.T @ mel).clamp_min(1e-10)  # (K, T)
        for _ in range(60):
            spec = spec * (fb.T @ mel) / (fb.T @ (fb @ spec) + 1e-12)
        mag = spec.clamp_min(0).sqrt().float()  # (K, T)
        window = torch.hann_window(win, periodic=True)
        stft_kw = dict(n_fft=n_fft, hop_length=hop, win_length=win, window=window, center=True)
        n_samples = (feats.shape[0] - 1) * hop
        g = torch.Generator().manual_seed(int(seed))
        angles = torch.polar(torch.ones_like(mag), torch.rand(mag.shape, generator=g) * 6.2832)
        prev = torch.zeros_like(angles)
        momentum = 0.99
        for _ in range(self.write_griffin_lim_iters):
            wave = torch.istft(mag * angles, length=n_samples, **stft_kw)
            rebuilt = torch.stft(wave, return_complex=True, **stft_kw)[:, : mag.shape[1]]
            if rebuilt.shape[1] < mag.shape[1]:
                rebuilt = torch.nn.functional.pad(rebuilt, (0, mag.shape[1] - rebuilt.shape[1]))
            nxt = rebuilt - (momentum / (1 + momentum)) * prev
            angles = nxt / nxt.abs().clamp_min(1e-12)
            prev = rebuilt
        wave = torch.istft(mag * angles, length=n_samples, **stft_kw).numpy()
        # The featurizer's frame t starts at t*hop (no centring): shift by half a window.
        wave = np.concatenate([np.zeros(win // 2, np.float32), wave, np.zeros(win - win // 2)])
        peak = float(np.abs(wave).max())
        wave = wave / peak * 0.9 if peak > 0 else wave
        buf = io.BytesIO()
        sf.write(buf, wave.astype(np.float32), sr, format="WAV", subtype="PCM_16")
        return Written(buf.getvalue(), "audio/wav", ".wav")
