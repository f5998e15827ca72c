"""Video: a base64 MP4/MKV/AVI file; the frame limit is read from the container index."""

from __future__ import annotations

from serve.modalities.base import ModalitySpec, register_spec


@register_spec("video")
class VideoSpec(ModalitySpec):
    pass
