"""Signal: inline ``[[...], ...]`` channels × length (or one channel ``[...]``), or a base64
``.npy`` (loaded without pickle) / CSV file."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from serve.config import Limits
from serve.errors import ApiError
from serve.modalities.base import ModalitySpec, RawInput, numeric_array, register


@register
class SignalSpec(ModalitySpec):
    name = "signal"

    def parse(self, value: Any, limits: Limits, param: str) -> RawInput:
        if isinstance(value, list):
            max_elems = limits.max_signal_channels * limits.max_signal_length
            one_channel = bool(value) and not isinstance(value[0], list)
            arr = numeric_array(
                [value] if one_channel else value, param, ndim=2, max_elems=max_elems
            )
            self._check_shape(arr.shape, limits, param)
            return RawInput(self.name, "array", arr, "", param)
        return super().parse(value, limits, param)

    @staticmethod
    def _check_shape(shape: tuple[int, ...], limits: Limits, param: str | None) -> None:
        c, length = shape
        if c > limits.max_signal_channels or length > limits.max_signal_length:
            raise ApiError(
                413,
                f"{param}: signal {c}x{length} exceeds "
                f"{limits.max_signal_channels} channels x "
                f"{limits.max_signal_length} steps",
                "too_large",
                param,
            )

    def sniff_suffix(self, raw: bytes) -> str:
        return ".npy" if raw.startswith(b"\x93NUMPY") else ".csv"

    def check_limits(self, item: RawInput, limits: Limits) -> None:
        if item.kind != "bytes":
            return
        if item.suffix == ".npy":
            try:
                f = io.BytesIO(item.data)
                fmt = np.lib.format
                version = fmt.read_magic(f)
                # Header only (shape, dtype): the data is not read, pickles never loaded.
                read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                shape, _, dtype = read(f)
            except Exception as e:  # noqa: BLE001 - malformed header
                raise ApiError(
                    400, f"{item.param}: not a valid .npy file ({e})", "decode_error", item.param
                ) from None
            if dtype.hasobject:
                raise ApiError(
                    400,
                    f"{item.param}: object arrays are refused (no pickle)",
                    "bad_dtype",
                    item.param,
                )
            if len(shape) == 1:
                shape = (1, shape[0])
            if len(shape) != 2:
                raise ApiError(
                    422,
                    f"{item.param}: signal must be 1-D or 2-D, got {shape}",
                    "wrong_shape",
                    item.param,
                )
            self._check_shape(shape, limits, item.param)
        else:
            lines = item.data.count(b"\n") + 1
            if lines > limits.max_signal_length + 1:
                raise ApiError(
                    413,
                    f"{item.param}: {lines} CSV rows exceed {limits.max_signal_length}",
                    "too_large",
                    item.param,
                )

    def cost(self, arr: np.ndarray) -> int:
        # (C, L) samples, in units of 128 steps.
        return max(1, int(arr.size) // 128)
