"""Per-modality request handling of the service: one thin spec per modality.

See :mod:`serve.modalities.base`. Adding a modality = one new module here with a
``@register_spec("name")`` class (only what differs from the generic spec); every module of
this package is imported automatically, as featurizers and encoders are.
"""

from __future__ import annotations

import importlib
import pkgutil

from serve.modalities.base import (
    SPECS,
    ModalitySpec,
    RawInput,
    get_spec,
    language_modality,
    register_spec,
    unregister_spec,
)


def _discover() -> None:
    # Import every modality module of this package so that each registers itself.
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_discover()

__all__ = [
    "SPECS",
    "ModalitySpec",
    "RawInput",
    "get_spec",
    "language_modality",
    "register_spec",
    "unregister_spec",
]
