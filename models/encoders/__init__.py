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
from typing import Any

from common.modalities import check_registered, discover_modules
from models.config import OmniConfig
from models.encoders.base import EncoderOutput, ModalityEncoder, Tokenized, random_token_mask

ENCODERS: dict[str, type[ModalityEncoder]] = {}
#: Encoder kinds that serve several modalities, selected per modality by a section's
#: ``kind`` field (``encoders.text: {kind: hf, tower: DIR}``); ``native`` (or no ``kind``)
#: is the modality's own registered encoder.
ENCODER_KINDS: dict[str, type[ModalityEncoder]] = {}


def register_encoder_kind(kind: str) -> Callable[[type[ModalityEncoder]], type[ModalityEncoder]]:
    """Class decorator registering an encoder kind (``hf``) usable by any modality it lists
    in ``cls.kind_modalities``."""

    def deco(cls: type[ModalityEncoder]) -> type[ModalityEncoder]:
        if kind == "native":
            raise ValueError("'native' is the modality's own encoder, not a kind")
        ENCODER_KINDS[kind] = cls
        return cls

    return deco


def section_kind(data: Any) -> str:
    """``kind`` of a section mapping or instance (``native`` when absent)."""
    if isinstance(data, dict):
        return str(data.get("kind") or "native")
    return str(getattr(data, "kind", "native") or "native")


def encoder_class(name: str, data: Any = None) -> type[ModalityEncoder]:
    """The encoder class of modality ``name`` for its section ``data`` (mapping or Config):
    the registered one, or the kind named by ``data["kind"]``.

    Raises:
        KeyError: no encoder for ``name`` / an unknown kind / a kind that does not serve
            ``name`` (the message lists what exists).
    """
    kind = section_kind(data)
    if kind == "native":
        if name not in ENCODERS:
            raise KeyError(f"no encoder registered for {name!r}; known: {sorted(ENCODERS)}")
        return ENCODERS[name]
    if kind not in ENCODER_KINDS:
        raise KeyError(
            f"encoders.{name}.kind: unknown kind {kind!r}; known: ['native', "
            f"{', '.join(repr(k) for k in sorted(ENCODER_KINDS))}]"
        )
    cls = ENCODER_KINDS[kind]
    if name not in cls.kind_modalities:
        raise KeyError(f"encoder kind {kind!r} does not serve {name!r} ({cls.kind_modalities})")
    return cls


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
    section = cfg.encoder_section(name)
    cls = encoder_class(name, section)
    if cls.modality != name:  # a kind serving several modalities
        return cls(cfg, section, modality=name)
    return cls(cfg, section)


discover_modules(__name__, __path__)

__all__ = [
    "ENCODERS",
    "ENCODER_KINDS",
    "EncoderOutput",
    "ModalityEncoder",
    "Tokenized",
    "build_encoder",
    "encoder_class",
    "random_token_mask",
    "register_encoder",
    "register_encoder_kind",
    "section_kind",
]
