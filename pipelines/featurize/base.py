"""The featurizer contract shared by the pipeline, training and serving.

A featurizer turns one raw item of its modality (file bytes, an array, or a string)
into the fixed featurized form of INTERFACES §1, raising :class:`SampleError` with a
machine-readable ``reason`` for anything it refuses. It is also a pure batch function
(``dict[str, np.ndarray] -> dict[str, np.ndarray]``, Ray Data's ``map_batches`` shape).
"""

from __future__ import annotations

import io
from typing import Any, ClassVar

import numpy as np

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
)
#: Row-level reasons used by the pipeline (the whole row is dropped).
ROW_REASONS: tuple[str, ...] = (
    "parse_error",
    "missing_id",
    "duplicate_id",
    "no_valid_modality",
)


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

    Subclasses set ``modality``, ``suffixes`` and ``dtype``, implement
    :meth:`from_bytes` (and :meth:`from_array` where arrays make sense), and register
    themselves with :func:`pipelines.featurize.register`.
    """

    modality: ClassVar[str] = ""
    #: File suffixes (lower case, with dot) this featurizer decodes; first is the default.
    suffixes: ClassVar[tuple[str, ...]] = ()
    dtype: ClassVar[np.dtype] = np.dtype(np.float32)

    def __init__(self, config: FeatureConfig | None = None, **_: Any) -> None:
        self.config = config or FeatureConfig()

    # -- single items -------------------------------------------------------------
    def from_bytes(self, data: bytes, suffix: str | None = None) -> np.ndarray:
        """Decodes, validates and featurizes one raw file's bytes."""
        raise NotImplementedError

    def from_array(self, array: np.ndarray, **kwargs: Any) -> np.ndarray:
        """Validates and featurizes one already-decoded array."""
        raise SampleError("unsupported_format", f"{self.modality} does not accept arrays")

    def output_shape(self) -> tuple[int | None, ...]:
        """Shape of one featurized item; ``None`` marks a variable (bounded) axis."""
        raise NotImplementedError

    def warm_up(self) -> None:
        """Loads what the first item would otherwise load lazily (heavy libraries), so a
        long-lived process (a serving replica) does not make its first request pay for it."""

    def featurize(self, item: Any, suffix: str | None = None) -> np.ndarray:
        """Dispatches one raw item by type: bytes -> :meth:`from_bytes`, else array."""
        if isinstance(item, bytes | bytearray | memoryview):
            return self.from_bytes(bytes(item), suffix=suffix)
        if isinstance(item, io.IOBase):
            return self.from_bytes(item.read(), suffix=suffix)
        if item is None:
            raise SampleError("empty", "no data")
        return self.from_array(np.asarray(item))

    # -- batches ------------------------------------------------------------------
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Featurizes a batch column; pure (the input batch is not modified).

        Args:
            batch: ``batch[modality]``: object array (B,) of raw items (bytes, arrays,
                or strings for text; ``None`` = absent). Optional
                ``batch[f"{modality}_suffix"]`` (B,) gives each item's file suffix.

        Returns:
            A new dict with every input key, ``modality`` replaced by an object array (B,)
            of featurized ndarrays (``None`` where absent or refused) and
            ``f"{modality}_error"`` (B,) holding ``"reason: detail"`` or ``None``.
        """
        m = self.modality
        items = batch[m]
        suffixes = batch.get(f"{m}_suffix")
        out_items = np.empty(len(items), dtype=object)
        errors = np.empty(len(items), dtype=object)
        for i, item in enumerate(items):
            if item is None:
                continue
            suffix = None if suffixes is None else suffixes[i]
            try:
                out_items[i] = self.featurize(item, suffix=suffix)
            except SampleError as e:
                errors[i] = str(e)
        out = dict(batch)
        out[m] = out_items
        out[f"{m}_error"] = errors
        return out


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
