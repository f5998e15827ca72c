"""Audio of the OmniDigits corpus: the digit's name spoken by ``espeak-ng`` with the
writer's voice; mostly 16/22.05 kHz mono WAV, some FLAC and stereo."""

from __future__ import annotations

import io
import subprocess
from typing import TYPE_CHECKING

import numpy as np

from jobs.demo.corpus.render_text import DIGIT_NAMES

if TYPE_CHECKING:
    from jobs.demo.corpus.plan import RowPlan


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


def _ambiguous_audio(x: np.ndarray, r: np.random.Generator) -> np.ndarray:
    """Speech under loud noise (SNR about -6 dB)."""
    f = x.astype(np.float32)
    rms = float(np.sqrt(np.mean(f**2))) or 1.0
    f = f + r.normal(0, 2.0 * rms, f.shape).astype(np.float32)
    return np.clip(np.round(f), -32768, 32767).astype(np.int16)
