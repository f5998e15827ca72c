"""The featurizer contract shared by the pipeline, training, evaluation and serving.

A featurizer turns one raw item of its modality (file bytes, an array, or an inline
value such as a string) into the fixed featurized form of its modality record
(:mod:`common.modalities`: dtype and rank), raising :class:`SampleError` with a
machine-readable ``reason`` for anything it refuses.

Two phases, so that a featurizer may learn statistics from the training split:
:meth:`Featurizer.decode` (stage 1, per item, in parallel) and :meth:`Featurizer.finalize`
(stage 2, after the driver called :meth:`Featurizer.fit` on the TRAIN split's decoded
items and merged the returned section updates into the data config).
:meth:`Featurizer.featurize` = ``finalize(decode(raw))`` is what serving and evaluation call.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from common.modalities import get_modality
from pipelines.config import FeatureConfig

#: Reasons a sample can be refused for (others may be added by new featurizers).
REASONS: tuple[str, ...] = (
    "decode_error",
    "truncated",
    "empty",
    "too_large",
    "non_finite",
    "outside_root",
    "bad_dtype",
    "bad_shape",
    "control_chars",
    "not_found",
    "unsupported_format",
    "bad_path",
    "decoder_crashed",
    "unsupported_uri",
)
#: Row-level reasons used by the pipeline (the whole row is dropped).
ROW_REASONS: tuple[str, ...] = (
    "parse_error",
    "missing_id",
    "bad_split",
    "duplicate_id",
    "no_valid_modality",
)

_PATHLIKE = re.compile(r"^[^\s]+\.[A-Za-z0-9]{1,8}$")


class SampleError(Exception):
    """A sample refused by a featurizer (or the pipeline's reader).

    Attributes:
        reason: Short machine-readable code (see :data:`REASONS`), e.g. ``truncated``.
        detail: Human-readable explanation.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class Featurizer:
    """Base class: one instance per modality and :class:`FeatureConfig`.

    A subclass declares its ``Config`` dataclass (its section of ``features:`` in the
    data YAML), ``suffixes``, :meth:`sniff`, :meth:`example`, :meth:`output_shape`,
    :meth:`max_output_shape` and :meth:`from_bytes` (and :meth:`from_array` /
    :meth:`from_value` where those inputs make sense), and registers itself with
    :func:`pipelines.featurize.register`, which sets ``modality`` and ``dtype`` (from the
    modality record).

    Attributes:
        config: The whole :class:`FeatureConfig`.
        section: This modality's ``Config`` instance (``config.section(modality)``).
    """

    @dataclass
    class Config:
        """A featurizer without settings."""

    modality: ClassVar[str] = ""
    #: Set by ``register`` from the modality record; featurized items have this dtype.
    dtype: ClassVar[np.dtype] = np.dtype(np.float32)
    #: File suffixes (lower case, with dot) this featurizer decodes; first is the default.
    suffixes: ClassVar[tuple[str, ...]] = ()
    #: dtype of the stage-1 (decoded) form when it differs from ``dtype``; ``"str"`` for a
    #: string (stored as a string column between the two stages). ``None``: ``dtype``.
    decoded_dtype: ClassVar[str | None] = None
    #: Needs the corpus BPE tokenizer (``tokenizer=`` / ``tokenizer_dir=``); prepare trains
    #: it on this modality's decoded items (``section.vocab_size``) unless one is given.
    tokenized: ClassVar[bool] = False
    #: Near-duplicate method of :mod:`pipelines.dedupe` for this modality (``"phash"`` on
    #: a uint8 image, ``"minhash"`` on a string), ``None`` when there is none.
    near_dedupe: ClassVar[str | None] = None
    #: Values of this modality describe a sample rather than being one (a caption, a
    #: metadata record): the same value on different samples is legitimate, so it is not
    #: deduplicated on its own unless ``dedupe.captions`` opts in. ``None``: the modality
    #: record's ``inline`` (see :meth:`is_caption`).
    caption: ClassVar[bool | None] = None
    #: :meth:`decode_windows` cuts a long item into timed windows (audio, video, signal);
    #: ``False``: an item is one segment without times.
    windowed: ClassVar[bool] = False

    def __init__(self, config: FeatureConfig | None = None, **_: Any) -> None:
        self.config = config or FeatureConfig()
        self.section = self.config.section(self.modality)

    # -- declared facts -------------------------------------------------------------
    def output_shape(self) -> tuple[int | None, ...]:
        """Shape of one featurized item; ``None`` marks a variable (bounded) axis."""
        raise NotImplementedError

    def max_output_shape(self) -> tuple[int, ...]:
        """Upper bound of every axis of :meth:`output_shape` (what encoders size for)."""
        shape = self.output_shape()
        if any(s is None for s in shape):
            raise NotImplementedError(f"{self.modality}: declare max_output_shape()")
        return tuple(int(s) for s in shape)  # type: ignore[arg-type]

    @classmethod
    def sniff(cls, data: bytes) -> str | None:
        """File suffix (``".png"``) from the first bytes; ``None``: not this modality's."""
        return None

    def example(self, rng: np.random.Generator, label: int = 0) -> tuple[Any, str | None]:
        """A small real-looking raw input whose content depends on ``label`` (0..9).

        Returns:
            ``(bytes of a file, suffix)``, or ``(inline value, None)``.
        """
        raise NotImplementedError

    def model_args(self) -> dict[str, Any]:
        """Top-level model config fields this featurizer fixes (default none)."""
        return {}

    def accepts_inline(self, value: Any) -> bool:
        """Whether a manifest value is the item itself rather than a path to a file.

        Only modalities whose record is ``inline`` take inline values; a string that looks
        like a file name with one of :attr:`suffixes` is a path.
        """
        if not get_modality(self.modality).inline:
            return False
        if isinstance(value, str):
            v = value.strip()
            return not (_PATHLIKE.match(v) and v.lower().endswith(self.suffixes))
        return True

    def exact_key(self, item: Any, data: bytes | None) -> str:
        """Content hash for exact deduplication: of the cleaned string when the decoded form
        is one, else of the file's raw bytes (of the decoded array for inline values)."""
        from pipelines.dedupe import content_hash

        if isinstance(item, str) or self.decoded_dtype == "str":
            return content_hash(str(item))
        if data is not None:
            return content_hash(data)
        a = np.ascontiguousarray(item)
        return content_hash(f"{a.dtype}{a.shape}".encode() + a.tobytes())

    def caption_key(self, item: Any) -> str | None:
        """For a caption (:meth:`is_caption`), a looser key than :meth:`exact_key` that
        ``dedupe.drop_captions_of_duplicate_rows`` compares (text: equal up to case, spacing
        and punctuation); ``None``: the exact key is compared."""
        return None

    @classmethod
    def is_caption(cls) -> bool:
        """Whether equal values of this modality on different rows are legitimate (see
        :attr:`caption`; by default: inline modalities, whose value is in the manifest)."""
        return get_modality(cls.modality).inline if cls.caption is None else bool(cls.caption)

    def warm_up(self) -> None:
        """Loads what the first item would otherwise load lazily (heavy libraries), so a
        long-lived process (a serving replica) does not make its first request pay for it."""

    # -- stage 1 -------------------------------------------------------------------
    def from_bytes(self, data: bytes, suffix: str | None = None) -> np.ndarray:
        """Decodes, validates and featurizes one raw file's bytes."""
        raise NotImplementedError

    def from_array(self, array: np.ndarray, **kwargs: Any) -> np.ndarray:
        """Validates and featurizes one already-decoded array."""
        raise SampleError("unsupported_format", f"{self.modality} does not accept arrays")

    def from_value(self, value: Any) -> np.ndarray:
        """An inline manifest/request value (a string, a JSON object) -> stage-1 form."""
        if isinstance(value, str | dict | list):
            raise SampleError(
                "unsupported_format", f"{self.modality} takes no inline {type(value).__name__}"
            )
        return self.from_array(np.asarray(value))

    def decode(self, raw: Any, suffix: str | None = None) -> Any:
        """Stage-1 form of one raw item: bytes -> :meth:`from_bytes`, ndarray ->
        :meth:`from_array`, anything else -> :meth:`from_value`."""
        if raw is None:
            raise SampleError("empty", "no data")
        if isinstance(raw, bytes | bytearray | memoryview):
            return self.from_bytes(bytes(raw), suffix=suffix)
        if isinstance(raw, io.IOBase):
            return self.from_bytes(raw.read(), suffix=suffix)
        if isinstance(raw, np.ndarray):
            return self.from_array(raw)
        return self.from_value(raw)

    def decode_noted(self, raw: Any, suffix: str | None = None) -> tuple[Any, dict[str, int]]:
        """:meth:`decode` plus what it repaired to accept the item, e.g.
        ``{"control_chars": 1, "control_chars_removed": 3}`` (counted in ``stats.json``
        ``cleaned``); the default repairs nothing."""
        return self.decode(raw, suffix), {}

    def decode_windows(
        self,
        raw: Any,
        suffix: str | None = None,
        *,
        window_s: float,
        hop_s: float,
        rate_hz: float | None = None,
    ) -> list[tuple[float | None, float | None, Any]]:
        """Stage-1 forms of the windows of one long item, for bulk embedding (``jobs.embed``).

        A :attr:`windowed` featurizer decodes the item once, cuts it into windows of
        ``window_s`` seconds every ``hop_s`` seconds (:func:`window_spans`) and featurizes
        each window as it would a clip of that length; the default (not windowed) returns
        the whole item as one segment without times.

        Args:
            raw: As :meth:`decode`.
            suffix: As :meth:`decode`.
            window_s: Window length in seconds.
            hop_s: Seconds between window starts.
            rate_hz: Samples (steps, frames) per second of an input that carries no rate
                itself (a signal, an in-memory array).

        Returns:
            ``[(start_s, end_s, item)]`` in time order (``(None, None, item)`` unwindowed).

        Raises:
            SampleError: As :meth:`decode`.
        """
        return [(None, None, self.decode(raw, suffix))]

    # -- statistics from the training split, and stage 2 -----------------------------
    def fit(self, items: list[Any]) -> dict[str, Any] | None:
        """Statistics from the TRAIN split's decoded items -> updates of this section.

        Prepare calls it only for featurizers that override it, and writes the merged
        section into ``data_config.yaml``; the default fits nothing.
        """
        return None

    def finalize(self, item: Any) -> np.ndarray:
        """Stage-1 form -> featurized item (applies fitted statistics); default identity."""
        return item

    def featurize(self, raw: Any, suffix: str | None = None) -> np.ndarray:
        """``finalize(decode(raw, suffix))``: what serving and evaluation call."""
        return self.finalize(self.decode(raw, suffix))

    @classmethod
    def has_stage2(cls) -> bool:
        """Whether stage 2 must transform this modality's stage-1 form (finalize or fit)."""
        return cls.finalize is not Featurizer.finalize or cls.fit is not Featurizer.fit

    @classmethod
    def is_fitted(cls, section: Any = None) -> bool:
        """Whether prepare must call :meth:`fit` on the training split (and so gather its
        decoded items on the driver). ``section``: this modality's ``Config``, for a
        featurizer that fits only under some settings (signal: ``normalize: dataset``);
        ``None`` asks whether it can fit at all."""
        return cls.fit is not Featurizer.fit


def window_spans(duration_s: float, window_s: float, hop_s: float) -> list[tuple[float, float]]:
    """``(start, end)`` seconds of the windows covering ``[0, duration_s]``.

    Windows start every ``hop_s`` seconds; there are ``1 + ceil((duration - window) / hop)``
    of them, so the last one reaches the end (and may be shorter than ``window_s``). An
    item no longer than one window is one span ``(0, duration)``.

    Example: 10 s, window 4 s, hop 2 s -> (0, 4), (2, 6), (4, 8), (6, 10).
    """
    if window_s <= 0 or hop_s <= 0:
        raise ValueError(f"window_s and hop_s must be > 0, got {window_s}, {hop_s}")
    duration_s = float(duration_s)
    if duration_s <= window_s:
        return [(0.0, duration_s)]
    # Rounded so that float noise (9.000000001 s) does not add a sliver window.
    n = 1 + math.ceil(round((duration_s - window_s) / hop_s, 9))
    return [(k * hop_s, min(k * hop_s + window_s, duration_s)) for k in range(n)]
@dataclass
class Written:
    """A featurized item written back to a file a person can open (:meth:`Featurizer.write`).

    Attributes:
        data: The file's bytes.
        mime: Its media type (``image/png``).
        suffix: Its file suffix (``.png``).
    """

    data: bytes
    mime: str
    suffix: str


def write_item(featurizer: Featurizer, item: np.ndarray, fmt: str | None = None) -> Written:
    """``featurizer.write(item, fmt)``, refusing modalities that have no writer.

    Raises:
        SampleError: ``unsupported_format`` when the featurizer has no writer or no ``fmt``.
    """
    if not has_writer(featurizer):
        raise SampleError("unsupported_format", f"{featurizer.modality} has no writer")
    return featurizer.write(item, fmt)  # type: ignore[attr-defined]


def has_writer(featurizer: Featurizer | type[Featurizer]) -> bool:
    """Whether the featurizer writes its featurized form back to a file (the inverse of
    featurization: ``write(item, fmt=None) -> Written`` and ``write_formats``)."""
    return callable(getattr(featurizer, "write", None))


def check_finite(x: np.ndarray, what: str) -> None:
    """Raises ``non_finite`` when ``x`` holds NaN or infinity."""
    if x.dtype.kind in "fc" and not np.isfinite(x).all():
        raise SampleError("non_finite", f"{what} contains NaN or infinite values")


def normalize_suffix(suffix: str | None, default: str) -> str:
    """``"PNG"``/``".png"``/``None`` -> ``".png"`` (``default`` when missing)."""
    if not suffix:
        return default
    suffix = suffix.lower()
    return suffix if suffix.startswith(".") else "." + suffix
