"""Per-modality request handling of the service: one thin spec per modality.

See :mod:`serve.modalities.base`. Adding a modality = one new module here with a
``@register_spec("name")`` class (only what differs from the generic spec); every module of
this package is imported automatically, as featurizers and encoders are.
"""

from __future__ import annotations

from common.modalities import discover_modules
from serve.modalities.base import (
    SPECS,
    ModalitySpec,
    RawInput,
    get_spec,
    language_modality,
    register_spec,
    unregister_spec,
)

discover_modules(__name__, __path__)

__all__ = [
    "SPECS",
    "ModalitySpec",
    "RawInput",
    "get_spec",
    "language_modality",
    "register_spec",
    "unregister_spec",
]
