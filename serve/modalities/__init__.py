"""Per-modality request handling of the service; importing this package registers all six.

See :mod:`serve.modalities.base`. A new modality = one new module here, imported below.
"""

from serve.modalities import audio, image, pointcloud, signal, text, video  # noqa: F401
from serve.modalities.base import SPECS, ModalitySpec, RawInput, get_spec, register

__all__ = ["SPECS", "ModalitySpec", "RawInput", "get_spec", "register"]
