"""Signal encoder: channel-independent 1-D patching of ``(B, C, L)`` series (PatchTST)."""

from __future__ import annotations

import torch
from torch import nn

from models.config import OmniConfig
from models.encoders import register_encoder
from models.encoders.base import ModalityEncoder, Tokenized


@register_encoder("signal")
class SignalEncoder(ModalityEncoder):
    """Each channel is cut into patches of length P that share one linear embedding;
    tokens get a channel embedding and a time-position embedding (C * L/P tokens)."""

    stem_names = ("proj",)

    def __init__(self, cfg: OmniConfig) -> None:
        super().__init__(cfg)
        self.channels = cfg.signal_channels
        self.length = cfg.signal_length
        self.patch = cfg.signal_patch
        self.target_dim = cfg.signal_patch
        self.proj = nn.Linear(cfg.signal_patch, cfg.d_model)
        n_time = cfg.signal_length // cfg.signal_patch
        self.time_pos = nn.Parameter(torch.randn(1, 1, n_time, cfg.d_model) * 0.02)
        self.channel_embed = nn.Parameter(
            torch.randn(1, cfg.signal_channels, 1, cfg.d_model) * 0.02
        )

    def tokenize(self, batch: dict[str, torch.Tensor]) -> Tokenized:
        x = self.input(batch)
        if x.dim() != 3 or x.shape[1] > self.channels or x.shape[2] > self.length:
            raise ValueError(
                f"signal must be (B, C<={self.channels}, L<={self.length}), got {tuple(x.shape)}"
            )
        b, c, length = x.shape
        if length % self.patch:
            raise ValueError(
                f"signal length {length} is not a multiple of signal_patch={self.patch}"
            )
        n = length // self.patch
        patches = x.to(torch.float32).reshape(b, c * n, self.patch)  # (B, C*N, P)
        pos = (self.channel_embed[:, :c] + self.time_pos[:, :, :n]).reshape(1, c * n, -1)
        mask = torch.ones(b, c * n, dtype=torch.bool, device=x.device)
        return Tokenized(x=self.proj(self.as_params(patches)), pos=pos, mask=mask, targets=patches)
