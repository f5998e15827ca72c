"""Featurizers, one file per modality, registered by name.

Usage (INTERFACES §2)::

    from pipelines.featurize import get_featurizer, FEATURIZERS, SampleError
    f = get_featurizer(name, feature_config)       # Featurizer (pipelines.featurize.base)
    arr = f.featurize(raw, suffix=f.sniff(raw))     # the record's dtype and rank

Adding a modality is one new module in this package that defines a
:class:`~pipelines.featurize.base.Featurizer` subclass decorated with
``@register("name")`` (``name`` must be declared in :mod:`common.modalities`); every
module here is imported with the registry.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from common.modalities import check_registered, discover_modules
from pipelines.config import FeatureConfig
from pipelines.featurize.base import REASONS, Featurizer, SampleError
from pipelines.tokenizer import TOKENIZER_DIR

#: name -> Featurizer subclass (filled by the modules of this package).
FEATURIZERS: dict[str, type[Featurizer]] = {}


def register(name: str):
    """Class decorator registering a :class:`Featurizer` subclass under ``name``.

    Sets ``cls.modality`` and ``cls.dtype`` (from the modality record).

    Raises:
        ValueError: ``name`` is not a declared modality, or is registered twice.
    """

    def deco(cls: type[Featurizer]) -> type[Featurizer]:
        record = check_registered("featurizers", name)
        if name in FEATURIZERS and FEATURIZERS[name].__qualname__ != cls.__qualname__:
            raise ValueError(f"featurizer {name!r} registered twice")
        cls.modality = name
        cls.dtype = record.np_dtype
        FEATURIZERS[name] = cls
        return cls

    return deco


def get_featurizer(
    name: str,
    config: FeatureConfig | None = None,
    *,
    assets_dir: str | Path | None = None,
    **kwargs: Any,
) -> Featurizer:
    """Builds the featurizer registered as ``name``.

    Args:
        name: Modality name.
        config: Feature sizes; defaults to :class:`FeatureConfig` defaults.
        assets_dir: A prepared-shards or export directory (local path or URI): a featurizer
            that needs files finds them there (a ``tokenized`` one its ``tokenizer/``).
        **kwargs: Featurizer-specific arguments (``tokenizer_dir`` / ``tokenizer`` for a
            ``tokenized`` featurizer) that win over ``assets_dir``.

    Raises:
        KeyError: For an unknown modality (the message lists the known ones).
    """
    if name not in FEATURIZERS:
        raise KeyError(f"unknown modality {name!r}; registered: {sorted(FEATURIZERS)}")
    cls = FEATURIZERS[name]
    config = config or FeatureConfig()
    if getattr(config.section(name), "tower", ""):
        # features.<m>.tower: the pretrained tower's processor is the featurizer.
        from pipelines.featurize._towers import TOWER_FEATURIZERS

        kwargs.pop("tokenizer", None), kwargs.pop("tokenizer_dir", None)
        return TOWER_FEATURIZERS[name](config, assets_dir=assets_dir, **kwargs)
    if (
        assets_dir is not None
        and cls.tokenized
        and "tokenizer" not in kwargs
        and "tokenizer_dir" not in kwargs
    ):
        kwargs["tokenizer_dir"] = f"{str(assets_dir).rstrip('/')}/{TOKENIZER_DIR}"
    return cls(config, **kwargs)


def build_featurizers(
    config: FeatureConfig | None,
    modalities: Iterable[str],
    *,
    assets_dir: str | Path | None = None,
) -> dict[str, Featurizer]:
    """One featurizer per modality (see :func:`get_featurizer`), in the given order."""
    return {m: get_featurizer(m, config, assets_dir=assets_dir) for m in modalities}


discover_modules(__name__, __path__)

__all__ = [
    "FEATURIZERS",
    "REASONS",
    "TOKENIZER_DIR",
    "Featurizer",
    "SampleError",
    "build_featurizers",
    "get_featurizer",
    "register",
]
