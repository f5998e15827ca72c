"""What the service needs to know about one modality, and the registry of serve specs.

One generic :class:`ModalitySpec`, driven by the modality record
(``common.modalities.get_modality(m)``), does the work for every modality:

* router side, :meth:`ModalitySpec.parse`: validate the JSON value of a request field and turn
  it into a :class:`RawInput` — cheap, no media decoding. An *inline* modality (record
  ``inline=True``: text, a tabular record) carries the value itself; any other modality takes
  a base64 file (or a ``data:`` URL; remote URLs are refused) or a JSON array handed to the
  featurizer's ``from_array``;
* replica side, :meth:`ModalitySpec.featurize`: the file type is sniffed by the featurizer
  (``Featurizer.sniff``), then the shared featurizer of ``pipelines.featurize`` decodes it,
  refusing oversized input from the headers (``SampleError("too_large")`` → 413), so the
  service preprocesses exactly as training did, with one set of limits (the featurizer
  config, which the serve args may tighten: ``OmniServeArgs.features``);
* batching, :meth:`ModalitySpec.cost`: the length of the item's variable axis (tokens,
  frames, points), 1 for a fixed-shape item; summed by ``@serve.batch``'s ``batch_size_fn``.

A per-modality file in this package only says what differs, e.g.::

    @register_spec("image")
    class ImageSpec(ModalitySpec):
        \"\"\"Image: a base64 PNG/JPEG/... file.\"\"\"

Every module of this package is imported on first use of the registry (no import line to
add); the name must be declared in ``common/modalities.py``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from common.modalities import Modality, check_registered, get_modality
from serve.errors import ApiError

if TYPE_CHECKING:
    from serve.config import Limits

#: ``RawInput.kind`` values.
KINDS: tuple[str, ...] = ("value", "bytes", "array")


@dataclasses.dataclass
class RawInput:
    """One validated, not yet featurized input.

    Attributes:
        modality: Modality name.
        kind: ``"value"`` (the inline value of an inline modality: a str, a JSON object),
            ``"bytes"`` (an encoded file) or ``"array"`` (a float32 ndarray given as nested
            JSON lists).
        data: The payload.
        param: Request field it came from, for error messages (e.g. ``input[3].image``).
    """

    modality: str
    kind: str
    data: Any
    param: str | None = None

    def nbytes(self) -> int:
        if self.kind == "bytes":
            return len(self.data)
        if self.kind == "array":
            return int(self.data.nbytes)
        return len(str(self.data).encode("utf-8", "replace"))


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
    if not value.isascii():
        raise ApiError(
            400, f"{param}: invalid base64 (non-ASCII characters)", "invalid_base64", param
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


def numeric_array(value: Any, param: str, max_rank: int, max_elems: int) -> np.ndarray:
    """Nested JSON lists -> float32 array of rank 1..``max_rank``, validated without blowing up.

    Raises:
        ApiError: 422 for a wrong type, ragged nesting or a rank above ``max_rank``, 413 for
            more than ``max_elems`` values, 400 for non-finite values.
    """
    if not isinstance(value, list) or not value:
        raise ApiError(
            422, f"{param} must be a non-empty nested list of numbers", "wrong_type", param
        )
    # Walk the nesting (bounded by max_rank) and count values before numpy allocates.
    n = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, list):
            continue
        if depth > max_rank:
            raise ApiError(422, f"{param} has rank above {max_rank}", "wrong_shape", param)
        n += len(node)
        if n > max_elems:
            raise ApiError(413, f"{param}: more than {max_elems} values", "too_large", param)
        stack.extend((c, depth + 1) for c in node)
    try:
        with np.errstate(over="ignore"):  # beyond float32: inf, refused below
            arr = np.asarray(value, dtype=np.float32)
    except OverflowError:  # a JSON integer beyond float64
        raise ApiError(400, f"{param} holds a number out of range", "non_finite", param) from None
    except (ValueError, TypeError):
        raise ApiError(
            422, f"{param} must be a rectangular nested list of numbers", "wrong_shape", param
        ) from None
    if arr.size == 0:
        raise ApiError(
            422, f"{param} has no values (shape {list(arr.shape)})", "wrong_shape", param
        )
    if not np.isfinite(arr).all():
        raise ApiError(400, f"{param} contains NaN or infinite values", "non_finite", param)
    return arr


class ModalitySpec:
    """The generic spec; a subclass per modality, registered with :func:`register_spec`.

    Subclasses override only what differs from the record-driven default, e.g.
    :attr:`inline_types` or :meth:`parse`.
    """

    #: Modality name, set by :func:`register_spec`.
    modality: ClassVar[str] = ""
    #: JSON types an inline modality accepts (None: any JSON value but null).
    inline_types: ClassVar[tuple[type, ...] | None] = None
    #: This modality is natural language: a bare JSON string in ``/v1/embeddings`` is one of
    #: its inputs, zero-shot label prompts are embedded with it, its ``cost`` is reported
    #: as OpenAI ``usage`` tokens. At most one spec sets it.
    language: ClassVar[bool] = False

    @property
    def record(self) -> Modality:
        """The modality's record in the table."""
        return get_modality(self.modality)

    # -- router side ------------------------------------------------------------------
    def parse(self, value: Any, limits: Limits, param: str) -> RawInput:
        """JSON value -> :class:`RawInput`; no media decoding.

        Raises:
            ApiError: 422 for a wrong JSON type or shape, 400 for an empty value, invalid
                base64 or a remote URL, 413 over the body limit.
        """
        if self.record.inline:
            return self.parse_inline(value, param)
        if isinstance(value, list):
            # Every JSON number takes >= 2 bytes of the body, which limits already bound.
            arr = numeric_array(value, param, self.record.rank, limits.max_body_bytes // 2)
            return RawInput(self.modality, "array", arr, param)
        return RawInput(self.modality, "bytes", decode_base64(value, limits, param), param)

    def parse_inline(self, value: Any, param: str) -> RawInput:
        """The inline value of an inline modality, type-checked (contents: the featurizer)."""
        types = self.inline_types
        if value is None or (types is not None and not isinstance(value, types)):
            want = " or ".join(t.__name__ for t in types) if types else "a JSON value"
            raise ApiError(
                422, f"{param} must be {want}, got {type(value).__name__}", "wrong_type", param
            )
        if (isinstance(value, str) and not value.strip()) or value in ({}, []):
            raise ApiError(400, f"{param} is empty", "empty", param)
        return RawInput(self.modality, "value", value, param)

    # -- replica side -----------------------------------------------------------------
    def sniff(self, featurizer: Any, data: bytes) -> str | None:
        """The file suffix of ``data`` (``".png"``), from the featurizer's magic bytes;
        None when it does not recognize them (the featurizer then decides)."""
        return type(featurizer).sniff(data)

    def featurize(self, featurizer: Any, item: RawInput) -> np.ndarray:
        """The featurized array of one input, exactly as the pipeline featurizes it.

        Raises:
            pipelines.featurize.SampleError: Refused input (``too_large`` → 413, else 400).
        """
        if item.kind == "bytes":
            return featurizer.featurize(item.data, suffix=self.sniff(featurizer, item.data))
        return featurizer.featurize(item.data)

    # -- batching ---------------------------------------------------------------------
    def cost(self, arr: np.ndarray) -> int:
        """Batching cost of one featurized item: the length of its variable axis (tokens,
        frames, points: the encoder's work grows with it), 1 for a fixed-shape item."""
        axis = self.record.var_axis
        return 1 if axis is None else max(1, int(arr.shape[axis]))


#: modality name -> spec class (filled by the modules of this package).
SPECS: dict[str, type[ModalitySpec]] = {}
_INSTANCES: dict[str, ModalitySpec] = {}


def register_spec(name: str):
    """Class decorator registering a :class:`ModalitySpec` subclass under ``name``.

    Raises:
        ValueError: ``name`` is not in the modality table, or registered twice.
    """

    def deco(cls: type[ModalitySpec]) -> type[ModalitySpec]:
        check_registered("serve specs", name)
        if name in SPECS and SPECS[name] is not cls:
            raise ValueError(f"serve spec {name!r} registered twice")
        cls.modality = name
        SPECS[name] = cls
        _INSTANCES.pop(name, None)
        return cls

    return deco


def language_modality() -> str | None:
    """The modality whose spec sets :attr:`ModalitySpec.language` (None when none does)."""
    return next((m for m, cls in SPECS.items() if cls.language), None)


def unregister_spec(name: str) -> None:
    """Removes a spec (tests that register a throwaway modality clean up with it)."""
    SPECS.pop(name, None)
    _INSTANCES.pop(name, None)


def get_spec(modality: str) -> ModalitySpec:
    """The (stateless, shared) spec instance of ``modality``.

    Raises:
        KeyError: No spec is registered (the message lists the known ones).
    """
    if modality not in _INSTANCES:
        try:
            _INSTANCES[modality] = SPECS[modality]()
        except KeyError:
            raise KeyError(
                f"no serve spec for modality {modality!r}; known: {sorted(SPECS)}"
            ) from None
    return _INSTANCES[modality]
