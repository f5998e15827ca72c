"""Tabular: a JSON object (``{"ink": 0.41, "pen": "blue"}``), a string holding one, or a
one-row CSV / Parquet / JSON file as a ``data:...;base64,`` URL.

The contents are checked by the featurizer on the replica, as in the pipeline: an
undeclared type or NaN is a 400 (``bad_dtype``, ``non_finite``, ``bad_shape``), more fields
than ``features.tabular.max_fields`` a 413 (``too_large``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from serve.modalities.base import ModalitySpec, RawInput, decode_base64, register_spec

if TYPE_CHECKING:
    from serve.config import Limits


@register_spec("tabular")
class TabularSpec(ModalitySpec):
    inline_types = (dict, str)

    def parse(self, value: Any, limits: Limits, param: str) -> RawInput:
        if isinstance(value, str) and value.lstrip()[:5].lower() == "data:":
            return RawInput(self.modality, "bytes", decode_base64(value, limits, param), param)
        return super().parse(value, limits, param)
