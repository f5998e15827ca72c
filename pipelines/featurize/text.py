"""Text featurizer: string or UTF-8 ``.txt`` -> int32 (L,) BPE ids ``<bos> ... <eos>``.

Two phases: :meth:`TextFeaturizer.decode` cleans (stage 1; the cleaned string is what
deduplication and tokenizer training see), :meth:`TextFeaturizer.finalize` tokenizes.
Cleaning: Unicode NFC, control characters
and ANSI escape sequences removed (tabs/newlines become spaces; counted in ``stats.json``
``cleaned``), whitespace collapsed, optional lower-casing, and length bounds. Text with more
than ``max_control_fraction`` control characters is refused as ``control_chars``.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.dedupe import normalize_text_key
from pipelines.featurize import register
from pipelines.featurize.base import Featurizer, SampleError
from pipelines.tokenizer import BOS_ID, EOS_ID, load_tokenizer

_WS = re.compile(r"\s+")
#: Whitespace control characters: become spaces.
_WS_CTRL = "\t\n\r\x0b\x0c"
#: Unicode categories removed: controls, surrogates, private use.
_CTRL = ("Cc", "Cs", "Co")
#: ANSI/VT100 escape sequences (colours, cursor moves): removed whole.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")


@register("text")
class TextFeaturizer(Featurizer):
    """Text -> int32 (L,), 2 <= L <= ``section.max_len``.

    Args:
        config: Feature config.
        tokenizer_dir: Directory (or ``tokenizer.json``) of the BPE tokenizer; only
            :meth:`clean` / :meth:`decode` work without one.
        tokenizer: An already loaded ``tokenizers.Tokenizer`` (instead of the dir).
    """

    @dataclass
    class Config:
        """Text cleaning and tokenization.

        Attributes:
            max_len: Token ids per sample, ``<bos>`` and ``<eos>`` included (longer is cut).
            vocab_size: Target BPE vocabulary size when a tokenizer is trained.
            min_chars: Cleaned text shorter than this is quarantined as ``empty``.
            max_chars: Cleaned text longer than this is quarantined as ``too_large``.
            max_control_fraction: Raw text whose share of control characters exceeds
                this is quarantined as ``control_chars`` (binary junk); below it they are
                stripped.
            lowercase: Lower-case after Unicode NFC normalization.
        """

        max_len: int = 32
        vocab_size: int = 1024
        min_chars: int = 1
        max_chars: int = 10_000
        # 0.1 refused short captions with a few stray controls ("a cat\\x00\\x00": 0.2).
        max_control_fraction: float = 0.25
        lowercase: bool = False

    suffixes = (".txt",)
    decoded_dtype = "str"
    tokenized = True
    near_dedupe = "minhash"

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

    def max_output_shape(self) -> tuple[int]:
        return (self.section.max_len,)

    @classmethod
    def sniff(cls, data: bytes) -> str | None:
        try:
            data[:4096].decode("utf-8-sig")
        except UnicodeDecodeError as e:
            if e.start < 4092:  # not a multi-byte character cut by the 4 KiB window
                return None
        return ".txt"

    def example(self, rng: np.random.Generator, label: int = 0) -> tuple[str, None]:
        """The inline string ``"item {label}"``."""
        return f"item {int(label)}", None

    def model_args(self) -> dict[str, Any]:
        """``vocab_size`` (of the tokenizer when one is loaded) and ``max_text_len``."""
        vocab = self.tokenizer.get_vocab_size() if self.tokenizer is not None else None
        return {
            "vocab_size": vocab or self.section.vocab_size,
            "max_text_len": self.section.max_len,
        }

    def clean(self, text: str) -> str:
        """Normalizes one string; raises ``control_chars``, ``empty`` or ``too_large``."""
        return self.clean_counted(text)[0]

    def clean_counted(self, text: str) -> tuple[str, int]:
        """:meth:`clean` plus the number of control characters it removed.

        ANSI escape sequences (``ESC [ 31 m``) go as a whole, other control characters one by
        one (tabs and line breaks become spaces). Refused as ``control_chars`` only when they
        are more than ``max_control_fraction`` of the text (binary junk, UTF-16 read as
        UTF-8), as ``empty`` when nothing is left.
        """
        cfg = self.section
        if not isinstance(text, str):
            raise SampleError("bad_dtype", f"text must be a string, got {type(text).__name__}")
        if not text:
            raise SampleError("empty", "empty text")
        text = unicodedata.normalize("NFC", text)
        n_ctrl = sum(1 for c in text if c not in _WS_CTRL and unicodedata.category(c) in _CTRL)
        if n_ctrl / len(text) > cfg.max_control_fraction:
            raise SampleError(
                "control_chars",
                f"{n_ctrl} of {len(text)} characters are control characters"
                f" (> features.text.max_control_fraction={cfg.max_control_fraction:g})",
            )
        if n_ctrl:
            n_before = len(text)
            text = _ANSI.sub("", text)
            text = "".join(
                " " if c in _WS_CTRL else c
                for c in text
                if c in _WS_CTRL or unicodedata.category(c) not in _CTRL
            )
            n_ctrl = n_before - len(text)
        text = _WS.sub(" ", text).strip()
        if cfg.lowercase:
            text = text.lower()
        if len(text) < max(cfg.min_chars, 1):
            raise SampleError("empty", f"{len(text)} characters after cleaning")
        if len(text) > cfg.max_chars:
            raise SampleError("too_large", f"{len(text)} characters > max_chars={cfg.max_chars}")
        return text, n_ctrl

    def decode_bytes(self, data: bytes) -> str:
        """Strict UTF-8 (BOM allowed) -> cleaned text; invalid UTF-8 is ``decode_error``."""
        return self.clean(self.text_of_bytes(data))

    def text_of_bytes(self, data: bytes) -> str:
        """Strict UTF-8 (BOM allowed) -> the raw string; invalid UTF-8 is ``decode_error``."""
        if not data:
            raise SampleError("empty", "zero-byte text file")
        if len(data) > 4 * self.section.max_chars + 16:
            raise SampleError("too_large", f"{len(data)} bytes of text")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise SampleError("decode_error", f"invalid UTF-8 at byte {e.start}") from e
        return text

    def tokenize(self, clean_text: str) -> np.ndarray:
        """Already cleaned text -> int32 ids ``<bos> ... <eos>`` cut to ``max_len``."""
        if self.tokenizer is None:
            raise RuntimeError("text featurizer has no tokenizer; pass tokenizer_dir=")
        ids = self.tokenizer.encode(clean_text, add_special_tokens=False).ids
        ids = ids[: max(self.section.max_len - 2, 0)]
        return np.asarray([BOS_ID, *ids, EOS_ID], dtype=np.int32)

    # -- the two phases ---------------------------------------------------------------
    def decode(self, raw: Any, suffix: str | None = None) -> str:
        """Stage 1: a string, UTF-8 bytes or a 0-d string array -> the cleaned string."""
        return self.decode_noted(raw, suffix)[0]

    def decode_noted(self, raw: Any, suffix: str | None = None) -> tuple[str, dict[str, int]]:
        """:meth:`decode` plus ``{"control_chars": 1, "control_chars_removed": n}`` when
        control characters were stripped."""
        if raw is None:
            raise SampleError("empty", "no data")
        if isinstance(raw, bytes | bytearray | memoryview):
            raw = self.text_of_bytes(bytes(raw))
        elif not isinstance(raw, str):
            a = np.asarray(raw)
            if not (a.ndim == 0 and isinstance(a.item(), str)):
                raise SampleError("bad_dtype", f"text must be a string, got {type(raw).__name__}")
            raw = a.item()
        text, n = self.clean_counted(raw)
        return text, ({"control_chars": 1, "control_chars_removed": n} if n else {})

    def finalize(self, item: Any) -> np.ndarray:
        """Stage 2: the cleaned string -> int32 token ids."""
        return self.tokenize(str(item))

    def caption_key(self, item: Any) -> str | None:
        return normalize_text_key(str(item))

    def from_text(self, text: str) -> np.ndarray:
        """Cleans and tokenizes one string -> int32 (L,)."""
        return self.featurize(text)

    def from_bytes(self, data: bytes, suffix: str | None = None) -> np.ndarray:
        """Decodes a UTF-8 ``.txt`` file and tokenizes it."""
        return self.featurize(data, suffix)

    def from_array(self, array: np.ndarray, **_: Any) -> np.ndarray:
        """A 0-d string array (how Ray Data batches hold strings) -> ids."""
        return self.featurize(array)

    def from_value(self, value: Any) -> np.ndarray:
        return self.featurize(value)

    def detokenize(self, ids: np.ndarray | list[int]) -> str:
        """Token ids -> text (special tokens dropped)."""
        if self.tokenizer is None:
            raise RuntimeError("text featurizer has no tokenizer; pass tokenizer_dir=")
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
