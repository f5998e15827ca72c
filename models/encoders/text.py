"""Text encoder: token embedding + learned positions + transformer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.config import OmniConfig
from models.encoders import register_encoder
from models.encoders.base import ModalityEncoder, Tokenized


@register_encoder("text")
class TextEncoder(ModalityEncoder):
    """Byte-level BPE ids ``(B, L)`` -> tokens ``(B, L, d)``; masked modelling targets are ids."""

    @dataclass
    class Config:
        """Section ``encoders.text``: empty, the vocabulary, special ids and ``max_text_len``
        are top-level ``OmniConfig`` fields (the text decoder shares them)."""

    target_kind = "tokens"

    @classmethod
    def input_shape(cls, cfg: OmniConfig, section: Config) -> tuple[int, ...]:
        return (cfg.max_text_len,)

    @classmethod
    def random_item(cls, cfg: OmniConfig, section: Config, rng: np.random.Generator) -> np.ndarray:
        """Random ids ``<bos> ... <eos>`` of a random length, above the special ids."""
        length = int(rng.integers(4, cfg.max_text_len + 1))
        ids = rng.integers(5, cfg.vocab_size, size=length)
        ids[0], ids[-1] = cfg.bos_id, cfg.eos_id
        return ids.astype(np.int32)

    def __init__(self, cfg: OmniConfig, section: Config | None = None) -> None:
        super().__init__(cfg, section)
        self.vocab_size = cfg.vocab_size
        self.pad_id = cfg.pad_id
        self.max_len = cfg.max_text_len
        self.target_dim = cfg.vocab_size
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Parameter(torch.randn(1, cfg.max_text_len, cfg.d_model) * 0.02)

    def tokenize(self, batch: dict[str, torch.Tensor]) -> Tokenized:
        ids = self.input(batch)
        if ids.dim() != 2 or ids.dtype.is_floating_point:
            raise ValueError(f"text must be integer ids (B, L), got {tuple(ids.shape)} {ids.dtype}")
        b, n = ids.shape
        if n > self.max_len:
            raise ValueError(f"text length {n} exceeds max_text_len={self.max_len}")
        ids = ids.long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"text ids must lie in [0, {self.vocab_size}), got out-of-range ids")
        mask = batch.get(f"{self.modality}_mask")
        mask = (ids != self.pad_id) if mask is None else mask.bool()
        return Tokenized(x=self.embed(ids), pos=self.pos[:, :n], mask=mask, targets=ids)
