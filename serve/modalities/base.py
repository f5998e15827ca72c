"""What the service needs to know about one modality, and the registry of them.

A :class:`ModalitySpec` has three jobs, split between the two sides of the service:

* router side, :meth:`ModalitySpec.parse`: validate the JSON value of a request field and turn
  it into a :class:`RawInput` (base64 decoded, byte size checked, nested lists turned into an
  array) — cheap, no media decoding;
* replica side, :meth:`ModalitySpec.check_limits` then :meth:`ModalitySpec.featurize`: read
  the media header to enforce the configured limits (pixels, seconds, frames, points)
  *before* decoding, then featurize with the shared ``pipelines.featurize`` featurizer so the
  service preprocesses exactly as training did;
* batching, :meth:`ModalitySpec.cost`: the cost of one featurized item, summed by
  ``@serve.batch``'s ``batch_size_fn`` so batches are bounded by work, not only by count.

Adding a modality to the service = one file in this package defining a spec and calling
:func:`register` (plus its featurizer and encoder in their own layers).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
from typing import Any, ClassVar

import numpy as np

from serve.config import Limits
from serve.errors import ApiError


@dataclasses.dataclass
class RawInput:
    """One validated, not yet featurized input.

    Attributes:
        modality: Modality name.
        kind: ``"text"`` (``data`` is a str), ``"bytes"`` (an encoded file) or ``"array"``
            (a numeric ndarray given inline as nested lists).
        data: The payload.
        suffix: File suffix sniffed from the bytes (``".png"``, ``".wav"``, ...), for
            ``kind == "bytes"``.
        param: Request field it came from, for error messages (e.g. ``input[3].image``).
    """

    modality: str
    kind: str
    data: Any
    suffix: str = ""
    param: str | None = None

    def nbytes(self) -> int:
        if self.kind == "bytes":
            return len(self.data)
        if self.kind == "array":
            return int(self.data.nbytes)
        return len(self.data.encode("utf-8", "replace"))


_URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_DATA_URL_RE = re.compile(r"^data:[^;,]*(;[^,]*)?;base64,", re.IGNORECASE)


def decode_base64(value: Any, limits: Limits, param: str) -> bytes:
    """Strictly decodes a base64 (or ``data:...;base64,``) string.

    Raises:
        ApiError: 422 for a non-string, 400 for a remote URL (never fetched), invalid
            base64 or an empty payload, 413 when the decoded bytes exceed the body limit.
    """
    if not isinstance(value, str):
        raise ApiError(
            422, f"{param} must be a base64 string, got {type(value).__name__}", "wrong_type", param
        )
    s = value.strip()
    if _URL_RE.match(s):
        raise ApiError(
            400,
            f"{param}: remote URLs are not fetched; send the file base64-encoded",
            "url_not_supported",
            param,
        )
    m = _DATA_URL_RE.match(s)
    if m:
        s = s[m.end() :]
    if len(s) * 3 // 4 > limits.max_body_bytes:
        raise ApiError(
            413, f"{param}: payload larger than {limits.max_body_bytes} bytes", "too_large", param
        )
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{param}: invalid base64 ({e})", "invalid_base64", param) from None
    if not raw:
        raise ApiError(400, f"{param}: empty payload", "empty", param)
    return raw


def numeric_array(value: Any, param: str, ndim: int, max_elems: int) -> np.ndarray:
    """Nested JSON lists -> float32 array of rank ``ndim``, validated without blowing up.

    Raises:
        ApiError: 422 for a wrong type or ragged/wrong-rank nesting, 413 for too many
            elements, 400 for non-finite values.
    """
    if not isinstance(value, list) or not value:
        raise ApiError(
            422, f"{param} must be a non-empty nested list of numbers", "wrong_type", param
        )
    # Count elements before numpy materializes anything large.
    n = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth == ndim:
            if not isinstance(node, list):
                raise ApiError(422, f"{param} must have rank {ndim}", "wrong_shape", param)
            n += len(node)
            if n > max_elems:
                raise ApiError(413, f"{param}: more than {max_elems} values", "too_large", param)
        else:
            if not isinstance(node, list):
                raise ApiError(422, f"{param} must have rank {ndim}", "wrong_shape", param)
            stack.extend((c, depth + 1) for c in node)
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError):
        raise ApiError(
            422, f"{param} must be a rectangular nested list of numbers", "wrong_shape", param
        ) from None
    if arr.ndim != ndim or arr.size == 0:
        raise ApiError(
            422, f"{param} must have rank {ndim}, got shape {list(arr.shape)}", "wrong_shape", param
        )
    if not np.isfinite(arr).all():
        raise ApiError(400, f"{param} contains NaN or infinite values", "non_finite", param)
    return arr


class ModalitySpec:
    """Base class: one subclass per modality, registered with :func:`register`."""

    #: Modality name (a key of ``pipelines.schema.MODALITIES``).
    name: ClassVar[str] = ""

    def parse(self, value: Any, limits: Limits, param: str) -> RawInput:
        """Router side: JSON value -> :class:`RawInput` (default: base64-encoded file)."""
        raw = decode_base64(value, limits, param)
        return RawInput(self.name, "bytes", raw, self.sniff_suffix(raw), param)

    def sniff_suffix(self, raw: bytes) -> str:
        """File suffix from the first bytes (featurizers dispatch on it)."""
        return ""

    def check_limits(self, item: RawInput, limits: Limits) -> None:
        """Replica side: refuses (413) inputs over the limits, reading headers only."""

    def featurize(self, featurizer: Any, item: RawInput) -> np.ndarray:
        """Replica side: the featurized array (Contract 2 form) of one input."""
        if item.kind == "bytes":
            return featurizer.from_bytes(item.data, suffix=item.suffix)
        return featurizer.from_array(item.data)

    def featurizer_kwargs(self, export_dir: str) -> dict[str, Any]:
        """Extra keyword arguments of ``get_featurizer`` for this modality."""
        return {}

    def cost(self, arr: np.ndarray) -> int:
        """Batching cost of one featurized item (default: 1 per item)."""
        return 1


SPECS: dict[str, ModalitySpec] = {}


def register(spec_cls: type[ModalitySpec]) -> type[ModalitySpec]:
    """Class decorator adding a spec to :data:`SPECS` under ``spec_cls.name``."""
    if not spec_cls.name:
        raise ValueError(f"{spec_cls.__name__} has no name")
    SPECS[spec_cls.name] = spec_cls()
    return spec_cls


def get_spec(modality: str) -> ModalitySpec:
    """The registered spec of ``modality`` (KeyError lists the known ones)."""
    try:
        return SPECS[modality]
    except KeyError:
        raise KeyError(f"no serve spec for modality {modality!r}; known: {sorted(SPECS)}") from None
