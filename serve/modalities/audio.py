"""Audio: a base64 WAV/FLAC/OGG; duration limit read from the header (soundfile)."""

from __future__ import annotations

import io

import numpy as np

from serve.config import Limits
from serve.errors import ApiError
from serve.modalities.base import ModalitySpec, RawInput, register


@register
class AudioSpec(ModalitySpec):
    name = "audio"

    def sniff_suffix(self, raw: bytes) -> str:
        if raw[:4] == b"RIFF" and raw[8:12] == b"WAVE":
            return ".wav"
        if raw[:4] == b"fLaC":
            return ".flac"
        if raw[:4] == b"OggS":
            return ".ogg"
        return ".wav"

    def check_limits(self, item: RawInput, limits: Limits) -> None:
        import soundfile as sf

        try:
            info = sf.info(io.BytesIO(item.data))
        except Exception as e:  # noqa: BLE001 - libsndfile rejects the bytes
            raise ApiError(
                400,
                f"{item.param}: not a decodable audio file ({type(e).__name__})",
                "decode_error",
                item.param,
            ) from None
        if info.samplerate <= 0 or info.frames <= 0:
            raise ApiError(400, f"{item.param}: audio has no samples", "empty", item.param)
        seconds = info.frames / info.samplerate
        if seconds > limits.max_audio_seconds:
            raise ApiError(
                413,
                f"{item.param}: {seconds:.1f} s exceeds {limits.max_audio_seconds} s",
                "too_large",
                item.param,
            )

    def cost(self, arr: np.ndarray) -> int:
        # (T, F) frames.
        return max(1, int(arr.shape[0]))
