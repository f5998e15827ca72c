"""Modality encoders, one file per modality, registered by name.

``build_encoder("audio", cfg)`` dispatches on the explicit modality name. A new modality is
one new file here that decorates its class with ``@register_encoder("<name>")`` plus an
import line below.
"""

from __future__ import annotations

from collections.abc import Callable

from models.config import OmniConfig
from models.encoders.base import EncoderOutput, ModalityEncoder, Tokenized, random_token_mask

ENCODERS: dict[str, type[ModalityEncoder]] = {}


def register_encoder(name: str) -> Callable[[type[ModalityEncoder]], type[ModalityEncoder]]:
    """Class decorator registering an encoder under ``name``."""

    def deco(cls: type[ModalityEncoder]) -> type[ModalityEncoder]:
        if name in ENCODERS:
            raise ValueError(f"encoder {name!r} registered twice")
        cls.modality = name
        ENCODERS[name] = cls
        return cls

    return deco


def build_encoder(name: str, cfg: OmniConfig) -> ModalityEncoder:
    """Instantiates the registered encoder ``name`` for ``cfg``."""
    if name not in ENCODERS:
        raise KeyError(f"no encoder registered for {name!r}; known: {sorted(ENCODERS)}")
    return ENCODERS[name](cfg)


# Registration side effects (one line per modality file).
from models.encoders import audio, image, pointcloud, signal, text, video  # noqa: E402,F401

__all__ = [
    "ENCODERS",
    "EncoderOutput",
    "ModalityEncoder",
    "Tokenized",
    "build_encoder",
    "random_token_mask",
    "register_encoder",
]
