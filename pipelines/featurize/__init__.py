"""Featurizers, one file per modality, registered by name.

Usage (INTERFACES §2)::

    from pipelines.featurize import get_featurizer, FEATURIZERS, SampleError
    f = get_featurizer("audio", feature_config)
    arr = f.from_bytes(raw, suffix=".wav")          # (T, F) float16
    ids = get_featurizer("text", cfg, tokenizer_dir=d).from_text("the digit seven")

Adding a modality is one new module in this package that defines a
:class:`~pipelines.featurize.base.Featurizer` subclass decorated with
``@register("name")``; every module here is imported on first use of the registry.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from pipelines.config import FeatureConfig
from pipelines.featurize.base import REASONS, Featurizer, SampleError

#: name -> Featurizer subclass (filled by the modules of this package).
FEATURIZERS: dict[str, type[Featurizer]] = {}


def register(name: str):
    """Class decorator registering a :class:`Featurizer` subclass under ``name``."""

    def deco(cls: type[Featurizer]) -> type[Featurizer]:
        if name in FEATURIZERS and FEATURIZERS[name] is not cls:
            raise ValueError(f"featurizer {name!r} registered twice")
        cls.modality = name
        FEATURIZERS[name] = cls
        return cls

    return deco


def _discover() -> None:
    # Import every modality module of this package so that each registers itself.
    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("base",) and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def get_featurizer(name: str, config: FeatureConfig | None = None, **kwargs: Any) -> Featurizer:
    """Builds the featurizer registered as ``name``.

    Args:
        name: Modality name, e.g. ``"image"``.
        config: Feature sizes; defaults to :class:`FeatureConfig` defaults.
        **kwargs: Modality-specific arguments (``tokenizer_dir`` for text).

    Raises:
        KeyError: For an unknown modality (the message lists the known ones).
    """
    if name not in FEATURIZERS:
        raise KeyError(f"unknown modality {name!r}; registered: {sorted(FEATURIZERS)}")
    return FEATURIZERS[name](config or FeatureConfig(), **kwargs)


_discover()

__all__ = ["FEATURIZERS", "REASONS", "Featurizer", "SampleError", "get_featurizer", "register"]
