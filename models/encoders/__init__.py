"""Modality encoders, one file per modality, registered by name and discovered.

``build_encoder("audio", cfg)`` instantiates the class registered as ``audio`` with its
section ``cfg.encoder_section("audio")``. A new modality is one new module in this package
whose class is decorated with ``@register_encoder("<name>")`` (the name must be declared in
``common/modalities.py``); every module here is imported when the package is.

An encoder class declares (see :class:`~models.encoders.base.ModalityEncoder`):

* ``Config``: the dataclass of its section of ``OmniConfig.encoders`` (validated in its
  ``__post_init__``, raising ``ConfigError`` naming the key);
* ``presets``: per named size, the section fields that differ (``{"base": {"patch": 4}}``);
* ``legacy_keys``: flat keys of old ``model_config.yaml`` exports -> section fields;
* ``sizes_for(max_shape)``: the featurizer's largest item shape -> section fields;
* ``input_shape(cfg, section)`` and ``random_item(cfg, section, rng)``: the largest item it
  takes and a random one (smoke tests, benchmarks).
"""

from __future__ import annotations

from collections.abc import Callable

from common.modalities import check_registered, discover_modules
from models.config import OmniConfig
from models.encoders.base import EncoderOutput, ModalityEncoder, Tokenized, random_token_mask

ENCODERS: dict[str, type[ModalityEncoder]] = {}


def register_encoder(name: str) -> Callable[[type[ModalityEncoder]], type[ModalityEncoder]]:
    """Class decorator registering an encoder under ``name`` (a declared modality)."""

    def deco(cls: type[ModalityEncoder]) -> type[ModalityEncoder]:
        check_registered("encoders", name)
        old = ENCODERS.get(name)
        if old is not None and old.__qualname__ != cls.__qualname__:
            raise ValueError(f"encoder {name!r} registered twice ({old} and {cls})")
        cls.modality = name
        ENCODERS[name] = cls
        return cls

    return deco


def build_encoder(name: str, cfg: OmniConfig) -> ModalityEncoder:
    """Instantiates the registered encoder ``name`` for ``cfg`` with its section."""
    if name not in ENCODERS:
        raise KeyError(f"no encoder registered for {name!r}; known: {sorted(ENCODERS)}")
    return ENCODERS[name](cfg, cfg.encoder_section(name))


discover_modules(__name__, __path__)

__all__ = [
    "ENCODERS",
    "EncoderOutput",
    "ModalityEncoder",
    "Tokenized",
    "build_encoder",
    "random_token_mask",
    "register_encoder",
]
