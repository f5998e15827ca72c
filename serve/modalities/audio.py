"""Audio: a base64 WAV/FLAC/OGG file; the duration limit is read from its header."""

from __future__ import annotations

from serve.modalities.base import ModalitySpec, register_spec


@register_spec("audio")
class AudioSpec(ModalitySpec):
    pass
