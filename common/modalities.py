"""The modality table: every modality OmniRay knows, declared once.

A :class:`Modality` record says what every layer needs to know about a modality without
knowing the modality itself: the dtype and rank of one featurized item (shards, collate),
the axis that varies per item (collate pads it) and whether collate emits a mask for it,
and whether a manifest row or a request carries the value itself (``inline``: text, a
tabular record) rather than a file.

Everything else derives from this table: the shard schema (``pipelines.schema``), the
collate rules (``models.data``), the model's default modality list and fusion-gate order
(``models.config``), the serve deployment names (``serve.config``). The three registries
(featurizers in ``pipelines/featurize/``, encoders in ``models/encoders/``, serve specs in
``serve/modalities/``) refuse a name that is not in the table.

Adding a modality: one :class:`Modality` line in :data:`MODALITIES` plus its featurizer,
encoder and serve spec files (each discovered automatically) and its YAML sections. A test
or a plug-in may add a record at run time with :func:`register_modality`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "MODALITIES",
    "Modality",
    "check_registered",
    "discover_modules",
    "get_modality",
    "modality_names",
    "register_modality",
    "unregister_modality",
]

_DTYPES = ("int32", "uint8", "float16", "float32")


@dataclass(frozen=True)
class Modality:
    """What every layer needs to know about one modality.

    Attributes:
        name: Manifest column, shard column, batch key, request field and registry name.
        dtype: numpy dtype of one featurized item as stored in shards (``int32`` token
            ids, ``uint8`` pixels, ``float16``/``float32`` features).
        rank: Number of dimensions of one featurized item.
        var_axis: The item axis whose length varies between items (collate pads it to the
            batch's longest); ``None`` when every item has the same shape.
        masked: collate always emits ``batch[f"{name}_mask"]`` ``(B, var_len)``; a
            modality with ``var_axis`` but ``masked=False`` gets one only when the lengths
            in a batch differ.
        inline: The manifest row / request carries the value itself (a string, a JSON
            object) rather than a path to / the bytes of a file.
    """

    name: str
    dtype: str
    rank: int
    var_axis: int | None = None
    masked: bool = False
    inline: bool = False

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or self.name != self.name.lower():
            raise ValueError(f"modality name {self.name!r} must be a lower-case identifier")
        if self.dtype not in _DTYPES:
            raise ValueError(f"modality {self.name}: dtype {self.dtype!r} not in {_DTYPES}")
        if self.rank < 1:
            raise ValueError(f"modality {self.name}: rank must be >= 1")
        if self.var_axis is not None and not 0 <= self.var_axis < self.rank:
            raise ValueError(f"modality {self.name}: var_axis {self.var_axis} outside rank")
        if self.masked and self.var_axis is None:
            raise ValueError(f"modality {self.name}: masked needs a var_axis")

    @property
    def np_dtype(self) -> np.dtype:
        """The featurized dtype as a numpy dtype."""
        return np.dtype(self.dtype)


#: name -> record, in the fixed order used for fusion gates and default modality lists.
MODALITIES: dict[str, Modality] = {
    m.name: m
    for m in (
        Modality("text", "int32", 1, var_axis=0, masked=True, inline=True),  # token ids (T,)
        Modality("image", "uint8", 3),  # (H, W, 3)
        Modality("audio", "float16", 2, var_axis=0, masked=True),  # log-mel (T, F)
        Modality("video", "uint8", 4),  # (F, H, W, 3)
        Modality("pointcloud", "float16", 2, var_axis=0),  # (N, C)
        Modality("signal", "float16", 2, var_axis=0, masked=True),  # (C, L), C varies
        Modality("tabular", "float32", 2, inline=True),  # (F, 3): value, present, kind
    )
}


def modality_names() -> tuple[str, ...]:
    """Every declared modality, in table order."""
    return tuple(MODALITIES)


def get_modality(name: str) -> Modality:
    """The record of ``name``.

    Raises:
        KeyError: ``name`` is not declared (the message lists the declared ones).
    """
    try:
        return MODALITIES[name]
    except KeyError:
        raise KeyError(f"unknown modality {name!r}; declared: {list(MODALITIES)}") from None


def register_modality(record: Modality) -> Modality:
    """Adds a record at run time (tests, plug-ins). Re-registering an equal record is a no-op.

    Raises:
        ValueError: A different record is already declared under that name.
    """
    old = MODALITIES.get(record.name)
    if old is not None and old != record:
        raise ValueError(f"modality {record.name!r} is already declared as {old}")
    MODALITIES[record.name] = record
    return record


def unregister_modality(name: str) -> None:
    """Removes a record added with :func:`register_modality` (tests clean up with it)."""
    MODALITIES.pop(name, None)


def check_registered(registry: str, name: str) -> Modality:
    """What every registry calls when a class registers under ``name``.

    Raises:
        ValueError: ``name`` is not in the modality table (a typo, or a record line that
            was not added), naming the registry.
    """
    if name not in MODALITIES:
        raise ValueError(
            f"{registry}: {name!r} is not a declared modality; add a Modality record to "
            f"common/modalities.py (declared: {list(MODALITIES)})"
        )
    return MODALITIES[name]


def discover_modules(package: str, path: Iterable[str]) -> None:
    """Imports every module of a per-modality package (``package.__path__``) so that each
    registers itself; ``base`` and ``_private`` modules are skipped. The three registries call
    it, so a new modality file needs no import line anywhere."""
    for info in pkgutil.iter_modules(list(path)):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
