"""Signal: inline ``[[...], ...]`` channels × length (or one channel ``[...]``), or a base64
``.npy`` (header checked, never unpickled) / CSV file."""

from __future__ import annotations

from serve.modalities.base import ModalitySpec, register_spec


@register_spec("signal")
class SignalSpec(ModalitySpec):
    pass
