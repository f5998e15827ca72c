"""Text: an inline string, tokenized with the export's BPE tokenizer."""

from __future__ import annotations

from serve.modalities.base import ModalitySpec, register_spec


@register_spec("text")
class TextSpec(ModalitySpec):
    inline_types = (str,)
    language = True
