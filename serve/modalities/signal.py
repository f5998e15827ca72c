"""Signal: inline ``[[...], ...]`` (channels × length, length × channels, or one channel
``[...]``; orientation as the export's ``features.signal.layout`` says, ``auto`` by default)
or a base64 ``.npy`` (header checked, never unpickled) / CSV file.

Any channel count the export's featurizer accepts (``channels``, or 1..``max_channels``);
items with different channel counts share a batch (collate pads channels), and an item's
batching cost is its channel count (the encoder's tokens grow with it). In a JSON array,
``null`` is NaN: trailing steps that are ``null`` in every channel are end padding and
trimmed by the featurizer, any other ``null`` is refused as ``non_finite``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from serve.modalities.base import ModalitySpec, RawInput, numeric_array, register_spec

if TYPE_CHECKING:
    from serve.config import Limits


def _has_null(value: list) -> bool:
    return any(v is None or (isinstance(v, list) and None in v) for v in value)


@register_spec("signal")
class SignalSpec(ModalitySpec):
    def parse(self, value: Any, limits: Limits, param: str) -> RawInput:
        """The generic parse, except that ``null`` values of a JSON array become NaN."""
        if not (isinstance(value, list) and _has_null(value)):
            return super().parse(value, limits, param)
        filled = [
            [0.0 if v is None else v for v in row] if isinstance(row, list) else row
            for row in value
        ]
        filled = [0.0 if v is None else v for v in filled]
        arr = numeric_array(filled, param, self.record.rank, limits.max_body_bytes // 2)
        if arr.ndim == 1:
            nulls = np.array([v is None for v in value])
        else:
            nulls = np.array([[v is None for v in row] for row in value])
        arr[nulls] = np.nan
        return RawInput(self.modality, "array", arr, param)
