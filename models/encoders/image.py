"""Image encoder: ViT patch embedding of uint8 ``(B, H, W, 3)`` images."""

from __future__ import annotations

import torch
from torch import nn

from models.config import OmniConfig
from models.encoders import register_encoder
from models.encoders.base import ModalityEncoder, Tokenized, to_unit_float


def patchify_image(img: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B, (H/p)*(W/p), p*p*C)`` row-major patches."""
    b, h, w, c = img.shape
    x = img.reshape(b, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


@register_encoder("image")
class ImageEncoder(ModalityEncoder):
    """Non-overlapping ``p x p`` patches -> linear embedding + learned 2-D positions."""

    def __init__(self, cfg: OmniConfig) -> None:
        super().__init__(cfg)
        self.size = cfg.image_size
        self.patch = cfg.image_patch
        n = (cfg.image_size // cfg.image_patch) ** 2
        self.target_dim = cfg.image_patch**2 * 3
        self.proj = nn.Linear(self.target_dim, cfg.d_model)
        self.pos = nn.Parameter(torch.randn(1, n, cfg.d_model) * 0.02)

    def tokenize(self, batch: dict[str, torch.Tensor]) -> Tokenized:
        img = self.input(batch)
        if img.dim() != 4 or tuple(img.shape[1:]) != (self.size, self.size, 3):
            raise ValueError(
                f"image must be (B, {self.size}, {self.size}, 3), got {tuple(img.shape)}"
            )
        patches = patchify_image(to_unit_float(img), self.patch)  # (B, N, p*p*3)
        mask = torch.ones(patches.shape[:2], dtype=torch.bool, device=img.device)
        return Tokenized(x=self.proj(patches), pos=self.pos, mask=mask, targets=patches)
