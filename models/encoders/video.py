"""Video encoder: spatio-temporal tubelets of uint8 ``(B, F, H, W, 3)`` clips (ViViT)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from common.config import ConfigError
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

    @dataclass
    class Config:
        """Section ``encoders.video``.

        Attributes:
            frames: Frames per clip F.
            size: Square frame side.
            patch: Spatial tubelet side.
            tubelet: Frames per tubelet.
            stem: ``linear`` (the ViViT tubelet embedding) or ``conv`` (the image
                encoder's stride-2 convolutional stem on every frame, then the ``tubelet``
                frames' tokens of one patch concatenated and projected: the same tokens,
                with a convolutional inductive bias for the strokes inside a patch).
        """

        frames: int = 8
        size: int = 32
        patch: int = 16
        tubelet: int = 2
        stem: str = "linear"

        def __post_init__(self) -> None:
            bad = [
                k
                for k, v in {
                    "size % patch": self.size % self.patch,
                    "frames % tubelet": self.frames % self.tubelet,
                }.items()
                if v
            ]
            if bad:
                raise ConfigError(f"sizes must divide evenly: {bad}")
            if self.stem not in ("conv", "linear"):
                raise ConfigError(f"stem must be conv|linear, got {self.stem!r}")
            if self.stem == "conv" and (self.patch < 2 or self.patch & (self.patch - 1)):
                raise ConfigError(f"stem=conv needs a power-of-two patch, got {self.patch}")

    presets = {"base": {"patch": 8}}
    legacy_keys = {
        "video_frames": "frames",
        "video_size": "size",
        "video_patch": "patch",
        "video_tubelet": "tubelet",
    }
    stem_names = ("proj",)

    @classmethod
    def sizes_for(cls, max_shape: Sequence[int]) -> dict:
        f, h, w = (int(v) for v in max_shape[:3])
        if h != w:
            raise ConfigError(f"video encoder needs square frames, featurizer gives {h}x{w}")
        return {"frames": f, "size": h}

    @classmethod
    def input_shape(cls, cfg: OmniConfig, section: Config) -> tuple[int, ...]:
        return (section.frames, section.size, section.size, 3)

    def __init__(self, cfg: OmniConfig, section: Config | None = None) -> None:
        super().__init__(cfg, section)
        sec = self.section
        self.frames = sec.frames
        self.size = sec.size
        self.patch = sec.patch
        self.tubelet = sec.tubelet
        n = (sec.frames // sec.tubelet) * (sec.size // sec.patch) ** 2
        self.target_dim = sec.tubelet * sec.patch**2 * 3
        self.conv = sec.stem == "conv"
        if self.conv:
            from models.encoders.image import conv_stem

            self.conv_stem = conv_stem(sec.patch, cfg.d_model)
            self.stem_norm = nn.LayerNorm(cfg.d_model)
            self.proj = nn.Linear(sec.tubelet * cfg.d_model, cfg.d_model)
            self.stem_names = ("conv_stem", "proj")
        else:
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
        if self.conv:
            tokens = self._conv_tokens(standardize(v))
        else:
            tokens = self.proj(self.as_params(tubes))
        return Tokenized(x=tokens, pos=self.pos, mask=mask, targets=tubes)

    def _conv_tokens(self, v: torch.Tensor) -> torch.Tensor:
        """``(B, F, H, W, 3)`` standardized clip -> ``(B, N, d)`` tokens in tubelet order."""
        b, f = v.shape[:2]
        t, g = self.tubelet, self.size // self.patch
        frames = self.as_params(v).reshape(b * f, self.size, self.size, 3).permute(0, 3, 1, 2)
        y = self.stem_norm(self.conv_stem(frames).flatten(2).transpose(1, 2))  # (B*F, g*g, d)
        d = y.shape[-1]
        y = y.reshape(b, f // t, t, g * g, d).permute(0, 1, 3, 2, 4)  # (B, F/t, g*g, t, d)
        return self.proj(y.reshape(b, (f // t) * g * g, t * d))
