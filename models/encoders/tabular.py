"""Tabular encoder: one token per declared field (FT-Transformer's feature tokenizer).

Input ``(B, F, 3)`` float: per field ``(value, present, kind)`` as the tabular featurizer
writes it (``kind`` 0 = numeric, 1 = categorical; ``value`` a standardized number or a
categorical code). Token ``f`` is::

    numeric:      value * w[f] + b[f]
    categorical:  table[code % buckets]
    + field[f]    (the field's identity, as a position embedding)

and a field is a valid token only where it is present, so missing fields are masked out
of attention like padding (Gorishniy et al. 2021, "Revisiting Deep Learning Models for
Tabular Data"). Masked modelling (``patches``, one value per token) reconstructs the
numeric value, or for a categorical field a fixed random scalar of its code (a stand-in
for its identity that a regression head can learn; the buffer is seeded, not trained).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from common.config import ConfigError
from models.config import OmniConfig
from models.encoders import register_encoder
from models.encoders.base import ModalityEncoder, Tokenized

#: Columns of a featurized item (the tabular featurizer's layout).
VALUE, PRESENT, KIND = 0, 1, 2


@register_encoder("tabular")
class TabularEncoder(ModalityEncoder):
    """Field tokens: numeric value * w + b or a categorical embedding, plus a field embedding."""

    stem_names = ("num_weight", "num_bias", "cat_table")

    @dataclass
    class Config:
        """Section ``encoders.tabular``.

        Attributes:
            num_fields: Declared fields F (fixed by the data config).
            buckets: Rows of the categorical embedding table, shared by every categorical
                field (the field embedding tells them apart); codes are folded modulo
                ``buckets``, so keep it >= the featurizer's ``buckets`` and vocab sizes + 1.
        """

        num_fields: int = 8
        buckets: int = 1024

        def __post_init__(self) -> None:
            if self.num_fields < 1:
                raise ConfigError(f"num_fields must be >= 1, got {self.num_fields}")
            if self.buckets < 1:
                raise ConfigError(f"buckets must be >= 1, got {self.buckets}")

    presets = {}  # no per-size deltas
    legacy_keys = {}  # new in this version: no flat keys of old exports

    @classmethod
    def sizes_for(cls, max_shape: Sequence[int]) -> dict[str, Any]:
        """``(F, 3)`` -> ``{"num_fields": F}``."""
        return {"num_fields": int(max_shape[0])}

    @classmethod
    def input_shape(cls, cfg: OmniConfig, section: Config) -> tuple[int, ...]:
        return (section.num_fields, 3)

    @classmethod
    def random_item(cls, cfg: OmniConfig, section: Any, rng: np.random.Generator) -> np.ndarray:
        """A valid random item: alternating numeric / categorical fields, ~80% present."""
        f = section.num_fields
        item = np.zeros((f, 3), dtype=np.float32)
        item[:, KIND] = np.arange(f) % 2
        item[:, PRESENT] = rng.random(f) < 0.8
        item[int(rng.integers(f)), PRESENT] = 1.0
        item[:, VALUE] = np.where(
            item[:, KIND] > 0, rng.integers(0, section.buckets, f), rng.standard_normal(f)
        )
        item[:, VALUE] *= item[:, PRESENT]
        return item

    def __init__(self, cfg: OmniConfig, section: Config | None = None) -> None:
        super().__init__(cfg, section)
        sec = self.section
        d = cfg.d_model
        self.num_fields = sec.num_fields
        self.buckets = sec.buckets
        self.target_dim = 1
        # FT-Transformer's init: U(-1/sqrt(d), 1/sqrt(d)) for the feature tokenizer. Raw
        # parameters (not nn.Linear/nn.Embedding), so the model's 0.02 init leaves them alone.
        s = 1.0 / math.sqrt(d)
        self.num_weight = nn.Parameter(torch.empty(sec.num_fields, d).uniform_(-s, s))
        self.num_bias = nn.Parameter(torch.empty(sec.num_fields, d).uniform_(-s, s))
        self.cat_table = nn.Parameter(torch.empty(sec.buckets, d).uniform_(-s, s))
        self.field_embed = nn.Parameter(torch.randn(1, sec.num_fields, d) * 0.02)
        gen = torch.Generator().manual_seed(0)
        self.register_buffer(
            "cat_target", torch.randn(sec.buckets, generator=gen), persistent=False
        )

    def tokenize(self, batch: dict[str, torch.Tensor]) -> Tokenized:
        x = self.input(batch)
        if x.dim() != 3 or x.shape[2] != 3 or x.shape[1] > self.num_fields:
            raise ValueError(f"tabular must be (B, F<={self.num_fields}, 3), got {tuple(x.shape)}")
        f = x.shape[1]
        x = x.to(torch.float32)
        value, present, is_cat = x[..., VALUE], x[..., PRESENT] > 0.5, x[..., KIND] > 0.5
        codes = torch.where(is_cat, value.round().long().clamp_min(0) % self.buckets, 0)
        w = self.num_weight[:f]
        num_tok = self.as_params(value).unsqueeze(-1) * w + self.num_bias[:f]  # (B, F, d)
        cat_tok = self.cat_table[codes]  # (B, F, d)
        tokens = torch.where(is_cat.unsqueeze(-1), cat_tok, num_tok)
        target = torch.where(is_cat, self.cat_target[codes].to(torch.float32), value)
        return Tokenized(
            x=tokens,
            pos=self.field_embed[:, :f],
            mask=present,
            targets=target.unsqueeze(-1),  # (B, F, 1)
        )
