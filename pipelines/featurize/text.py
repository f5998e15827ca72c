"""Text featurizer: string or UTF-8 ``.txt`` -> int32 (L,) BPE ids ``<bos> ... <eos>``.

Cleaning (also used before tokenizer training): Unicode NFC, control characters
removed (tabs/newlines become spaces), whitespace collapsed, optional lower-casing, and
length bounds. Text that is mostly control characters is refused as ``control_chars``.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.featurize import register
from pipelines.featurize.base import Featurizer, SampleError
from pipelines.tokenizer import BOS_ID, EOS_ID, load_tokenizer

_WS = re.compile(r"\s+")


@register("text")
class TextFeaturizer(Featurizer):
    """Text -> int32 (L,), 2 <= L <= ``config.text.max_len``.

    Args:
        config: Feature config.
        tokenizer_dir: Directory (or ``tokenizer.json``) of the BPE tokenizer; only
            :meth:`clean` works without one.
        tokenizer: An already loaded ``tokenizers.Tokenizer`` (instead of the dir).
    """

    suffixes = (".txt",)
    dtype = np.dtype(np.int32)

    def __init__(
        self,
        config=None,
        tokenizer_dir: str | Path | None = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(config, **kwargs)
        self.tokenizer = tokenizer
        if self.tokenizer is None and tokenizer_dir is not None:
            self.tokenizer = load_tokenizer(tokenizer_dir)

    def output_shape(self) -> tuple[None]:
        return (None,)

    def clean(self, text: str) -> str:
        """Normalizes one string; raises ``control_chars``, ``empty`` or ``too_large``."""
        cfg = self.config.text
        if not isinstance(text, str):
            raise SampleError("bad_dtype", f"text must be a string, got {type(text).__name__}")
        if not text:
            raise SampleError("empty", "empty text")
        text = unicodedata.normalize("NFC", text)
        n_ctrl = sum(
            1 for c in text if unicodedata.category(c) in ("Cc", "Cs", "Co") and c not in "\t\n\r"
        )
        if n_ctrl / len(text) > cfg.max_control_fraction:
            raise SampleError(
                "control_chars", f"{n_ctrl} of {len(text)} characters are control characters"
            )
        # Whitespace controls become spaces; other control/surrogate/private chars go.
        text = "".join(
            " " if c in "\t\n\r\x0b\x0c" else c
            for c in text
            if c in "\t\n\r\x0b\x0c" or unicodedata.category(c) not in ("Cc", "Cs", "Co")
        )
        text = _WS.sub(" ", text).strip()
        if cfg.lowercase:
            text = text.lower()
        if len(text) < max(cfg.min_chars, 1):
            raise SampleError("empty", f"{len(text)} characters after cleaning")
        if len(text) > cfg.max_chars:
            raise SampleError("too_large", f"{len(text)} characters > max_chars={cfg.max_chars}")
        return text

    def decode_bytes(self, data: bytes) -> str:
        """Strict UTF-8 (BOM allowed) -> cleaned text; invalid UTF-8 is ``decode_error``."""
        if not data:
            raise SampleError("empty", "zero-byte text file")
        if len(data) > 4 * self.config.text.max_chars + 16:
            raise SampleError("too_large", f"{len(data)} bytes of text")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise SampleError("decode_error", f"invalid UTF-8 at byte {e.start}") from e
        return self.clean(text)

    def tokenize(self, clean_text: str) -> np.ndarray:
        """Already cleaned text -> int32 ids ``<bos> ... <eos>`` cut to ``max_len``."""
        if self.tokenizer is None:
            raise RuntimeError("text featurizer has no tokenizer; pass tokenizer_dir=")
        ids = self.tokenizer.encode(clean_text, add_special_tokens=False).ids
        ids = ids[: max(self.config.text.max_len - 2, 0)]
        return np.asarray([BOS_ID, *ids, EOS_ID], dtype=np.int32)

    def from_text(self, text: str) -> np.ndarray:
        """Cleans and tokenizes one string -> int32 (L,)."""
        return self.tokenize(self.clean(text))

    def from_bytes(self, data: bytes, suffix: str | None = None) -> np.ndarray:
        """Decodes a UTF-8 ``.txt`` file and tokenizes it."""
        return self.tokenize(self.decode_bytes(data))

    def from_array(self, array: np.ndarray, **_: Any) -> np.ndarray:
        """A 0-d string array (how Ray Data batches hold strings) -> ids."""
        a = np.asarray(array)
        if a.ndim == 0 and isinstance(a.item(), str):
            return self.from_text(a.item())
        raise SampleError("bad_dtype", f"text must be a string, got array {a.dtype}{a.shape}")

    def featurize(self, item: Any, suffix: str | None = None) -> np.ndarray:
        if isinstance(item, str):
            return self.from_text(item)
        return super().featurize(item, suffix=suffix)

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """Token ids -> text (special tokens dropped)."""
        if self.tokenizer is None:
            raise RuntimeError("text featurizer has no tokenizer; pass tokenizer_dir=")
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
