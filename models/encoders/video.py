"""Video encoder: spatio-temporal tubelets of uint8 ``(B, F, H, W, 3)`` clips (ViViT)."""

from __future__ import annotations

import torch
from torch import nn

from models.config import OmniConfig
from models.encoders import register_encoder
from models.encoders.base import ModalityEncoder, Tokenized, standardize


@register_encoder("video")
class VideoEncoder(ModalityEncoder):
    """``t x p x p`` tubelets -> linear embedding + learned space-time positions.

    Each clip is standardized per channel first (clips are mostly static background, whose
    mean would otherwise dominate every tubelet); the targets of masked modelling are the
    standardized tubelets (MAE's normalized-pixel targets).
    """

    stem_names = ("proj",)

    def __init__(self, cfg: OmniConfig) -> None:
        super().__init__(cfg)
        self.frames = cfg.video_frames
        self.size = cfg.video_size
        self.patch = cfg.video_patch
        self.tubelet = cfg.video_tubelet
        n = (cfg.video_frames // cfg.video_tubelet) * (cfg.video_size // cfg.video_patch) ** 2
        self.target_dim = cfg.video_tubelet * cfg.video_patch**2 * 3
        self.proj = nn.Linear(self.target_dim, cfg.d_model)
        self.pos = nn.Parameter(torch.randn(1, n, cfg.d_model) * 0.02)

    def tokenize(self, batch: dict[str, torch.Tensor]) -> Tokenized:
        v = self.input(batch)
        want = (self.frames, self.size, self.size, 3)
        if v.dim() != 5 or tuple(v.shape[1:]) != want:
            raise ValueError(
                f"video must be (B, {', '.join(map(str, want))}), got {tuple(v.shape)}"
            )
        b = v.shape[0]
        t, p = self.tubelet, self.patch
        x = standardize(v).reshape(b, self.frames // t, t, self.size // p, p, self.size // p, p, 3)
        x = x.permute(0, 1, 3, 5, 2, 4, 6, 7)  # (B, F/t, H/p, W/p, t, p, p, 3)
        tubes = x.reshape(b, -1, self.target_dim)  # (B, N, t*p*p*3)
        mask = torch.ones(tubes.shape[:2], dtype=torch.bool, device=v.device)
        return Tokenized(x=self.proj(self.as_params(tubes)), pos=self.pos, mask=mask, targets=tubes)
