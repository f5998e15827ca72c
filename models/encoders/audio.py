"""Audio encoder: patches of consecutive log-mel frames ``(B, T, F)`` (AST/SSAST-like)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.config import OmniConfig
from models.encoders import register_encoder
from models.encoders.base import ModalityEncoder, Tokenized


@register_encoder("audio")
class AudioEncoder(ModalityEncoder):
    """Groups ``audio_patch`` frames x all mel bins into one token; variable T via mask."""

    stem_names = ("proj",)

    def __init__(self, cfg: OmniConfig) -> None:
        super().__init__(cfg)
        self.bins = cfg.audio_bins
        self.patch = cfg.audio_patch
        self.max_frames = cfg.audio_max_frames
        self.target_dim = cfg.audio_patch * cfg.audio_bins
        self.proj = nn.Linear(self.target_dim, cfg.d_model)
        self.pos = nn.Parameter(torch.randn(1, cfg.audio_max_patches, cfg.d_model) * 0.02)

    def tokenize(self, batch: dict[str, torch.Tensor]) -> Tokenized:
        x = self.input(batch)
        if x.dim() != 3 or x.shape[2] != self.bins:
            raise ValueError(f"audio must be (B, T, {self.bins}), got {tuple(x.shape)}")
        b, t, f = x.shape
        if t > self.max_frames:
            raise ValueError(f"audio has {t} frames, more than audio_max_frames={self.max_frames}")
        frame_mask = batch.get("audio_mask")
        frame_mask = (
            torch.ones(b, t, dtype=torch.bool, device=x.device)
            if frame_mask is None
            else frame_mask.bool()
        )
        x = x.to(torch.float32) * frame_mask.unsqueeze(-1)  # padded frames are exactly zero
        pad = (-t) % self.patch
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
            frame_mask = F.pad(frame_mask, (0, pad))
        n = (t + pad) // self.patch
        patches = x.reshape(b, n, self.patch * f)  # (B, N, P*F)
        mask = frame_mask.reshape(b, n, self.patch).any(-1)  # (B, N)
        return Tokenized(
            x=self.proj(self.as_params(patches)), pos=self.pos[:, :n], mask=mask, targets=patches
        )
