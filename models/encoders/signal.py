"""Signal encoder: channel-independent 1-D patching of ``(B, C, L)`` series (PatchTST).

Any channel count up to ``channels`` in one batch (MOMENT-style): every channel is patched
with the same embedding, tokens carry a learned channel embedding (row c of a table of
``channels`` rows) and a time-position embedding, and the padded channels of a batch
(``batch["signal_mask"]`` ``(B, C)`` from collate) mask their tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.config import ConfigError
from models.config import OmniConfig
from models.encoders import register_encoder
from models.encoders.base import ModalityEncoder, Tokenized
from models.generation import GenSpace, register_space


@register_encoder("signal")
class SignalEncoder(ModalityEncoder):
    """Each channel is cut into patches of length P that share one linear embedding;
    tokens get a channel embedding and a time-position embedding (C * L/P tokens, those of
    padded channels masked)."""

    @dataclass
    class Config:
        """Section ``encoders.signal``.

        Attributes:
            channels: Most channels C: the size of the channel-embedding table
                (the featurizer's ``max_output_shape()[0]``); a batch may have fewer.
            length: Longest series L.
            patch: PatchTST patch length.
            channel_init: Standard deviation of the channel-embedding table's init. The
                default 0.02 (that of every position table) makes channels nearly
                indistinguishable at first next to the fan-in scaled patch embedding
                (~0.6 per unit): a corpus whose classes live in WHICH channel is high
                (LPC cepstra) learns that late. ~0.5 makes the channel identity as loud as
                the values from the first step.
        """

        channels: int = 3
        length: int = 128
        patch: int = 16
        channel_init: float = 0.02

        def __post_init__(self) -> None:
            if self.channels < 1:
                raise ConfigError(f"channels must be >= 1, got {self.channels}")
            if not self.channel_init > 0:
                raise ConfigError(f"channel_init must be > 0, got {self.channel_init}")
            if self.length % self.patch:
                raise ConfigError("sizes must divide evenly: ['length % patch']")

    presets = {"base": {"patch": 8}}
    legacy_keys = {
        "signal_channels": "channels",
        "signal_length": "length",
        "signal_patch": "patch",
    }
    stem_names = ("proj",)

    @classmethod
    def sizes_for(cls, max_shape: Sequence[int]) -> dict:
        return {"channels": int(max_shape[0]), "length": int(max_shape[1])}

    @classmethod
    def input_shape(cls, cfg: OmniConfig, section: Config) -> tuple[int, ...]:
        return (section.channels, section.length)

    def __init__(self, cfg: OmniConfig, section: Config | None = None) -> None:
        super().__init__(cfg, section)
        sec = self.section
        self.channels = sec.channels
        self.length = sec.length
        self.patch = sec.patch
        self.target_dim = sec.patch
        self.proj = nn.Linear(sec.patch, cfg.d_model)
        n_time = sec.length // sec.patch
        self.time_pos = nn.Parameter(torch.randn(1, 1, n_time, cfg.d_model) * 0.02)
        self.channel_embed = nn.Parameter(
            torch.randn(1, sec.channels, 1, cfg.d_model) * sec.channel_init
        )

    @classmethod
    def random_item(cls, cfg: OmniConfig, section: Config, rng: np.random.Generator) -> np.ndarray:
        """A random ``(channels, length)`` item: every channel (benchmarks' token counts are
        those of the largest input; real corpora mix channel counts)."""
        return rng.standard_normal(cls.input_shape(cfg, section)).astype(np.float16)

    def tokenize(self, batch: dict[str, torch.Tensor]) -> Tokenized:
        """``batch["signal"]`` ``(B, C, L)`` (+ ``signal_mask`` ``(B, C)``) -> ``C * L/P``
        tokens per row; the tokens of padded channels are masked (and zero)."""
        x = self.input(batch)
        if x.dim() != 3 or x.shape[1] > self.channels or x.shape[2] > self.length:
            raise ValueError(
                f"signal must be (B, C<={self.channels}, L<={self.length}), got {tuple(x.shape)}"
            )
        b, c, length = x.shape
        if length % self.patch:
            raise ValueError(f"signal length {length} is not a multiple of patch={self.patch}")
        n = length // self.patch
        ch_mask = batch.get(f"{self.modality}_mask")  # (B, C), True = real channel
        if ch_mask is None:
            ch_mask = torch.ones(b, c, dtype=torch.bool, device=x.device)
        ch_mask = ch_mask.to(device=x.device, dtype=torch.bool)
        x = x.to(torch.float32) * ch_mask.unsqueeze(-1)  # padded channels are exactly zero
        patches = x.reshape(b, c * n, self.patch)  # (B, C*N, P), channel-major
        pos = (self.channel_embed[:, :c] + self.time_pos[:, :, :n]).reshape(1, c * n, -1)
        mask = ch_mask.repeat_interleave(n, dim=1)  # (B, C*N)
        return Tokenized(x=self.proj(self.as_params(patches)), pos=pos, mask=mask, targets=patches)


@register_space("signal")
class SignalSpace(GenSpace):
    """Generation space of a signal: (C, L) standardized series, C cropped/padded to
    ``generation.signal_channels`` (the loss counts real channels only); an MLP velocity
    net. Its classifier features are the samples (default :meth:`GenSpace.probe_features`).
    Evaluated from text by default."""

    eval_sources = ("text",)

    @classmethod
    def for_model(cls, cfg, gen, modality):
        from models.encoders import ENCODERS

        _, length = ENCODERS[modality].input_shape(cfg, cfg.encoder_section(modality))
        return cls((gen.signal_channels, length))

    def from_batch(self, x, mask):
        x = x.float()
        b, c, length = x.shape
        cg, lg = self.shape
        w = torch.ones(b, c, device=x.device) if mask is None else mask.float()
        if length != lg:
            x = F.interpolate(x, size=lg, mode="linear", align_corners=True)
        if c < cg:
            x = torch.cat([x, x.new_zeros(b, cg - c, lg)], 1)
            w = torch.cat([w, w.new_zeros(b, cg - c)], 1)
        z, w = x[:, :cg], w[:, :cg]
        return z, w[..., None].expand(b, cg, lg).contiguous()

    def to_item(self, z):
        return z.float().cpu().numpy().astype(np.float16)

    def plot(self, ax, item):
        for ch in np.asarray(item, np.float32):
            ax.plot(ch, lw=0.6)
