"""Video: a base64 MP4 (any container decord reads); frame limit read from the container."""

from __future__ import annotations

import io

import numpy as np

from serve.config import Limits
from serve.errors import ApiError
from serve.modalities.base import ModalitySpec, RawInput, register


@register
class VideoSpec(ModalitySpec):
    name = "video"

    def sniff_suffix(self, raw: bytes) -> str:
        if raw[4:8] == b"ftyp":
            return ".mp4"
        if raw.startswith(b"\x1aE\xdf\xa3"):
            return ".mkv"
        if raw[:4] == b"RIFF" and raw[8:12] == b"AVI ":
            return ".avi"
        return ".mp4"

    def check_limits(self, item: RawInput, limits: Limits) -> None:
        import decord

        try:
            # Opening the container reads the index, not the frames.
            vr = decord.VideoReader(io.BytesIO(item.data), num_threads=1)
            n = len(vr)
            del vr
        except Exception as e:  # noqa: BLE001 - decord raises RuntimeError/DECORDError
            raise ApiError(
                400,
                f"{item.param}: not a decodable video ({type(e).__name__})",
                "decode_error",
                item.param,
            ) from None
        if n <= 0:
            raise ApiError(400, f"{item.param}: video has no frames", "empty", item.param)
        if n > limits.max_video_frames:
            raise ApiError(
                413,
                f"{item.param}: {n} frames exceed {limits.max_video_frames}",
                "too_large",
                item.param,
            )

    def cost(self, arr: np.ndarray) -> int:
        # (F, H, W, 3): cost in 32x32 frame tiles.
        return max(1, int(arr.shape[0] * arr.shape[1] * arr.shape[2]) // 1024)
