"""Text: an inline string, tokenized with the export's BPE tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from serve.config import Limits
from serve.errors import ApiError
from serve.modalities.base import ModalitySpec, RawInput, register


@register
class TextSpec(ModalitySpec):
    name = "text"

    def parse(self, value: Any, limits: Limits, param: str) -> RawInput:
        if not isinstance(value, str):
            raise ApiError(
                422, f"{param} must be a string, got {type(value).__name__}", "wrong_type", param
            )
        if not value.strip():
            raise ApiError(400, f"{param} is empty", "empty", param)
        if len(value) > limits.max_text_chars:
            raise ApiError(
                413, f"{param}: longer than {limits.max_text_chars} characters", "too_large", param
            )
        return RawInput(self.name, "text", value, "", param)

    def featurize(self, featurizer: Any, item: RawInput) -> np.ndarray:
        return featurizer.from_text(item.data)

    def featurizer_kwargs(self, export_dir: str) -> dict[str, Any]:
        return {"tokenizer_dir": str(Path(export_dir) / "tokenizer")}

    def cost(self, arr: np.ndarray) -> int:
        # (L,) token ids: attention work grows with length.
        return max(1, int(arr.shape[0]))
